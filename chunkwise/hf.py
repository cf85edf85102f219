"""Public path of the `transformers.Trainer` integration (`chunkwise.integrations.trainer`).

    from chunkwise.hf import ChunkwiseConfig, ChunkwiseTrainer
"""

from chunkwise.core.config import ChunkwiseConfig
from chunkwise.integrations.trainer import ChunkwiseTrainer, ChunkwiseTrainerMixin, check_training_arguments

__all__ = ["ChunkwiseConfig", "ChunkwiseTrainer", "ChunkwiseTrainerMixin", "check_training_arguments"]
