"""The `chunkwise train` recipe: configuration, set-up, the loop, checkpoint state, torchrun backends,
held-out evaluation and reporting."""
