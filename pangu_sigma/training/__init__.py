"""Training: the train entry point, the optimizer step, the learning-rate schedule, checkpoints and logging."""
