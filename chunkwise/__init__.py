"""chunkwise: fine-tune long-context causal LMs chunk by chunk (SeCO: exact; SpaCO: sparse, unbiased)."""

from .cache import ChunkCache
from .engine import ChunkwiseOutput, SeCO, SpaCO
from .objectives import DPO, GRPO, IPO, CrossEntropy, Objective, SequenceLoss, SimPO, TokenLoss
from .sampling import BernoulliSampler, ChunkSampler, ChunkSelection, UniformSampler

__all__ = [
    "SeCO",
    "SpaCO",
    "ChunkwiseOutput",
    "ChunkCache",
    "ChunkSampler",
    "ChunkSelection",
    "UniformSampler",
    "BernoulliSampler",
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
