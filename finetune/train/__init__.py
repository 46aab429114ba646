"""The training loop (trainer.py) and its parts: loss, optimizers, checkpoints, validation, progress."""
