"""chunkwise: fine-tune long-context causal LMs chunk by chunk (SeCO: exact; SpaCO: sparse, unbiased)."""

from chunkwise.core.cache import ChunkCache
from chunkwise.core.config import ChunkwiseConfig
from chunkwise.core.engine import ChunkwiseOutput, SeCO, SpaCO
from chunkwise.core.objectives import DPO, GRPO, IPO, CrossEntropy, Objective, SequenceLoss, SimPO, TokenLoss
from chunkwise.core.sampling import AdaptiveSampler, BernoulliSampler, ChunkSampler, ChunkSelection, UniformSampler

__all__ = [
    "SeCO",
    "SpaCO",
    "ChunkwiseOutput",
    "ChunkwiseConfig",
    "ChunkCache",
    "ChunkSampler",
    "ChunkSelection",
    "UniformSampler",
    "BernoulliSampler",
    "AdaptiveSampler",
    "Objective",
    "CrossEntropy",
    "TokenLoss",
    "SequenceLoss",
    "DPO",
    "IPO",
    "SimPO",
    "GRPO",
]
__version__ = "0.1.0"
