"""Training: optimizer and schedules, the pure step, checkpoints, metrics writers, the loop."""
