"""Training: optimizers, schedules, clipping, data and the trainer loop."""
