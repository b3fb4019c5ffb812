"""Evaluation (perplexity, expert load) and text generation."""
