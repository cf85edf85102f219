"""The attention choices a user names (`--attention`), apart from the kernels: the command line checks them before
torch is imported (`chunkwise.attention.chunk` re-exports them)."""

ATTENTION_CHOICES = ("chunkwise", "model")
""""chunkwise": the engine's own attention for SDPA models; "model": the model's attention throughout."""
