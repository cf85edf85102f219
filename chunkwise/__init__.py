"""chunkwise: fine-tune long-context causal LMs chunk by chunk (SeCO: exact; SpaCO: sparse, unbiased).

The public names are imported on first use (`from chunkwise import SeCO` works as ever): `import chunkwise`
alone loads no torch, so the `chunkwise` command checks its arguments in a fraction of a second.
"""

from __future__ import annotations

import importlib

# Each public name and the module that defines it.
_PUBLIC = {
    "SeCO": "chunkwise.core.engine",
    "SpaCO": "chunkwise.core.engine",
    "ChunkwiseOutput": "chunkwise.core.engine",
    "ChunkwiseConfig": "chunkwise.core.config",
    "ChunkCache": "chunkwise.core.cache",
    "ChunkSampler": "chunkwise.core.sampling",
    "ChunkSelection": "chunkwise.core.sampling",
    "UniformSampler": "chunkwise.core.sampling",
    "BernoulliSampler": "chunkwise.core.sampling",
    "AdaptiveSampler": "chunkwise.core.sampling",
    "Objective": "chunkwise.core.objectives",
    "CrossEntropy": "chunkwise.core.objectives",
    "TokenLoss": "chunkwise.core.objectives",
    "SequenceLoss": "chunkwise.core.objectives",
    "DPO": "chunkwise.core.objectives",
    "IPO": "chunkwise.core.objectives",
    "SimPO": "chunkwise.core.objectives",
    "GRPO": "chunkwise.core.objectives",
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, imported from its module the first time it is asked for (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'chunkwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
