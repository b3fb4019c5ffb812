"""Cluster planning: rank tables, the layout/memory plan, parameter and memory counts."""
