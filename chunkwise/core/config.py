"""`ChunkwiseConfig`: the engine's settings, checked once, and the one place an engine is built from them.

`chunkwise train`, `ChunkwiseTrainer`, the TRL trainers and `chunkwise bench` all describe their engine
with a `ChunkwiseConfig` and build it with `ChunkwiseConfig.make_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkwise.attention.chunk import ATTENTION_CHOICES
from chunkwise.core.engine import SeCO, SpaCO
from chunkwise.core.sampling import SAMPLERS, ChunkSampler, make_sampler
from chunkwise.utils.memory import parse_bytes

METHODS = ("seco", "spaco")


@dataclass
class ChunkwiseConfig:
    """How `ChunkwiseTrainer` trains each batch (see `SeCO` and `SpaCO` for the algorithms)."""

    method: str = "seco"
    """"seco" (exact gradient, every chunk backpropagated) or "spaco" (a sampled subset of the chunks)."""
    chunk_size: int | str = 1024
    """Tokens per chunk; activation memory is that of one chunk. Also the chunk size of evaluation.
    "auto": for each batch shape, the largest chunk that fits the device's free memory (plus what the
    model, its gradients and optimizer state already hold) less a 10% margin (`chunkwise.plan`)."""
    budget: int | None = None
    """SpaCO only, required there: chunks backpropagated per step (on average, for "bernoulli")."""
    sampling: str = "uniform"
    """SpaCO selection policy: "uniform" (the paper's, exactly `budget` chunks), "bernoulli" (unbiased) or
    "adaptive" (decided in stage 2 from targets and relay: unbiased, keeps the chunks holding the targets)."""
    max_compensation: float | None = None
    """SpaCO only: cap on the compensation factor (the paper uses 2.0); None for no cap."""
    seed: int | None = None
    """Seed of SpaCO's chunk sampler; None uses `TrainingArguments.seed`. Every rank uses the same seed."""
    attention: str = "chunkwise"
    """"chunkwise" (the engine's attention for SDPA models; less memory per token) or "model" (see `SeCO`)."""
    offload_kv: bool = False
    """Keep the KV cache and its gradient in host memory, streamed to the device block by block (see `SeCO`)."""
    memory: int | str | None = None
    """With chunk_size="auto": plan for this much device memory (bytes, or "24GiB") instead of its free memory."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ChunkwiseConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"ChunkwiseConfig.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.chunk_size != "auto" and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"ChunkwiseConfig.chunk_size must be a positive integer (tokens per chunk) or 'auto', got {self.chunk_size!r}")
        if self.memory is not None:
            if self.chunk_size != "auto":
                raise ValueError("ChunkwiseConfig.memory is the budget of chunk_size='auto'; set chunk_size='auto' or drop memory")
            parse_bytes(str(self.memory), "ChunkwiseConfig.memory")
        if self.sampling not in SAMPLERS:
            raise ValueError(f"ChunkwiseConfig.sampling must be one of {tuple(SAMPLERS)}, got {self.sampling!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"ChunkwiseConfig.seed must be an integer or None, got {self.seed!r}")
        if self.method == "seco":
            # These only shape SpaCO; set with SeCO they most likely mean the user wanted SpaCO.
            for option in ("budget", "max_compensation"):
                if getattr(self, option) is not None:
                    raise ValueError(
                        f"ChunkwiseConfig.{option} only applies to method='spaco' (SeCO backpropagates every "
                        f"chunk); set method='spaco' or drop {option}"
                    )
            return
        if self.budget is None:
            raise ValueError("ChunkwiseConfig(method='spaco') needs budget: how many chunks to backpropagate per step")
        # The sampler checks budget and max_compensation with its own messages; fail here, not at step 1.
        make_sampler(self.sampling, budget=self.budget, max_compensation=self.max_compensation, seed=0)

    def make_sampler(self, default_seed: int) -> ChunkSampler | None:
        """SpaCO's chunk sampler (None for SeCO); the trainer owns it so its state survives engine rebuilds."""
        if self.method == "seco":
            return None
        seed = default_seed if self.seed is None else self.seed
        return make_sampler(self.sampling, budget=self.budget, max_compensation=self.max_compensation, seed=seed)

    def make_engine(self, model: torch.nn.Module, *, chunk_size: int | None = None, sampler: ChunkSampler | None = None,
                    full_loss: bool = True) -> SeCO:
        """The engine these settings describe, for `model` (maybe DDP-, DeepSpeed-, FSDP2- or PEFT-wrapped).

        Args:
            chunk_size: the chunk to use when `self.chunk_size` is "auto" (the caller planned it), or to override it.
            sampler: SpaCO's sampler, when the caller owns one whose state must outlive this engine (Trainer
                checkpoints); by default a fresh one from `make_sampler(self.seed or 0)`.
            full_loss: SpaCO reports the exact loss (LM head on skipped chunks too) or only its estimate.
        """
        chunk_size = chunk_size or self.chunk_size
        if chunk_size == "auto":
            raise ValueError("chunk_size='auto' is planned per batch shape: pass the planned chunk_size= to make_engine")
        options = dict(chunk_size=chunk_size, attention=self.attention, offload_kv=self.offload_kv)
        if self.method == "seco":
            return SeCO(model, **options)
        return SpaCO(model, sampling=sampler or self.make_sampler(default_seed=0), full_loss=full_loss, **options)

