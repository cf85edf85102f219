"""Public path of the TRL integration (`chunkwise.integrations.trl`); TRL itself is imported on first use.

    from chunkwise.trl_trainers import ChunkwiseDPOTrainer, ChunkwiseGRPOTrainer
"""

from chunkwise.integrations.trl import ChunkwiseDPOMixin, ChunkwiseGRPOMixin, right_padded


def __getattr__(name: str):
    """`ChunkwiseDPOTrainer` / `ChunkwiseGRPOTrainer`: built (and TRL imported) only when asked for."""
    from chunkwise.integrations import trl

    return getattr(trl, name)


__all__ = ["ChunkwiseDPOMixin", "ChunkwiseGRPOMixin", "ChunkwiseDPOTrainer", "ChunkwiseGRPOTrainer", "right_padded"]
