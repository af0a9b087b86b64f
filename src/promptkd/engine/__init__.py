"""The one training loop (AMP, DDP, accumulation, checkpoints, resume) and distributed helpers."""
