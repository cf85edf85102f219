"""`ChunkwiseConfig`: the engine's settings, checked once, and the one place an engine is built from them.

The checks themselves (`check_engine_settings`) also serve `chunkwise train`'s `TrainConfig`, which names
the settings as command-line options (`OptionNames`).

`chunkwise train`, `ChunkwiseTrainer`, the TRL trainers and `chunkwise bench` all describe their engine
with a `ChunkwiseConfig` and build it with `ChunkwiseConfig.make_engine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chunkwise.attention.names import ATTENTION_CHOICES
from chunkwise.core.names import METHODS, SAMPLING_POLICIES
from chunkwise.utils.sizes import parse_bytes

# The engines (and torch) are imported where they are built: `chunkwise train` checks its settings here before
# anything heavy loads.
if TYPE_CHECKING:
    import torch

    from chunkwise.core.engine import SeCO
    from chunkwise.core.sampling import ChunkSampler


@dataclass(frozen=True)
class OptionNames:
    """How an error message names a setting, so one check serves the Python API and the command line.

    `owner="ChunkwiseConfig"`: `ChunkwiseConfig.budget`, `budget`, `method='spaco'`;
    `owner=None` (command-line options): `--budget`, `--budget`, `--method spaco`.
    """

    owner: str | None = None

    def __call__(self, field: str) -> str:
        """The setting as the subject of a message: `ChunkwiseConfig.chunk_size` or `--chunk-size`."""
        return f"{self.owner}.{field}" if self.owner else self.short(field)

    def short(self, field: str) -> str:
        """The setting where its owner is already clear: `chunk_size` or `--chunk-size`."""
        return field if self.owner else "--" + field.replace("_", "-")

    def value(self, field: str, value) -> str:
        """The setting with a value: `method='spaco'` or `--method spaco`."""
        return f"{field}={value!r}" if self.owner else f"{self.short(field)} {value}"


def check_choice(value, choices, name: str) -> None:
    """Raise the one message for a setting outside its choices; `name` is how the caller spells it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_engine_settings(settings, *, names: OptionNames, methods: tuple[str, ...] = METHODS) -> None:
    """The checks of the engine's settings, for `ChunkwiseConfig` and `chunkwise train`'s `TrainConfig` alike.

    `settings` has the attributes method, chunk_size, budget, sampling, max_compensation, attention and memory;
    `methods` the methods its owner accepts (`TrainConfig` adds "full", ordinary backprop).
    """
    check_choice(settings.method, methods, names("method"))
    check_choice(settings.attention, ATTENTION_CHOICES, names("attention"))
    check_choice(settings.sampling, SAMPLING_POLICIES, names("sampling"))
    chunk_size = settings.chunk_size
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{names('chunk_size')} must be a positive integer (tokens per chunk) or 'auto', got {chunk_size!r}")
    if settings.memory is not None:
        if chunk_size != "auto":
            # (Worded as each audience's tests have long read it: the API's "is", the command line's "sets".)
            raise ValueError(f"{names('memory')} {'is' if names.owner else 'sets'} the budget of {names.value('chunk_size', 'auto')}; "
                             f"set {names.value('chunk_size', 'auto')} or drop {names.short('memory')}")
        parse_bytes(str(settings.memory), names("memory"))
    if settings.method != "spaco":
        # These only shape SpaCO; set with another method they most likely mean the user wanted SpaCO.
        for option in ("budget", "max_compensation"):
            if getattr(settings, option) is not None:
                raise ValueError(f"{names(option)} only applies to {names.value('method', 'spaco')} (the other methods "
                                 f"backpropagate every chunk); set {names.value('method', 'spaco')} or drop {names.short(option)}")
        return
    if settings.budget is None:
        raise ValueError(f"{names.value('method', 'spaco')} needs {names.short('budget')}: how many chunks to backpropagate per step")
    # The sampler's own checks of these two, here too with the setting's name (`--budget`) and before torch loads.
    budget, cap = settings.budget, settings.max_compensation
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{names('budget')} must be a positive integer (chunks backpropagated per step), got {budget!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 1):
        raise ValueError(f"{names('max_compensation')} must be a number >= 1 (a factor below 1 would shrink the gradient), or "
                         f"None for no cap; got {cap!r}")
    # The sampler checks budget and max_compensation with its own messages; fail here, not at step 1 (this one
    # check imports torch, with the sampler).
    from chunkwise.core.sampling import make_sampler

    make_sampler(settings.sampling, budget=settings.budget, max_compensation=settings.max_compensation, seed=0)


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
        check_engine_settings(self, names=OptionNames(owner="ChunkwiseConfig"))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"ChunkwiseConfig.seed must be an integer or None, got {self.seed!r}")

    def make_sampler(self, default_seed: int) -> ChunkSampler | None:
        """SpaCO's chunk sampler (None for SeCO); the trainer owns it so its state survives engine rebuilds."""
        from chunkwise.core.sampling import make_sampler

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
        from chunkwise.core.engine import SeCO, SpaCO

        chunk_size = chunk_size or self.chunk_size
        if chunk_size == "auto":
            raise ValueError("chunk_size='auto' is planned per batch shape: pass the planned chunk_size= to make_engine")
        options = dict(chunk_size=chunk_size, attention=self.attention, offload_kv=self.offload_kv)
        if self.method == "seco":
            return SeCO(model, **options)
        return SpaCO(model, sampling=sampler or self.make_sampler(default_seed=0), full_loss=full_loss, **options)

