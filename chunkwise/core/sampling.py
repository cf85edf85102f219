"""SpaCO chunk selection: which chunks stage 2 backpropagates, and the compensation factor.

A gradient path from the loss of chunk i back through p KV hops to the parameters survives only if
all p + 1 chunks on it are backpropagated. Each selected chunk multiplies its loss and its KV-gradient
relay by the factor f, so a surviving path is scaled by f^(p+1).

* `bernoulli` (ours): each chunk independently with probability q = budget / k, f = 1/q. A path
  survives with probability q^(p+1) and is scaled by q^-(p+1): the estimate is exactly unbiased.
  The number of chunks varies (budget on average).
* `uniform` (the paper): exactly `budget` of the k chunks, f = k / budget. Fixed compute; a path of
  p >= 1 hops survives with probability t(t-1)...(t-p) / (k(k-1)...(k-p)) < (t/k)^(p+1), so long
  chains are slightly under-weighted (biased).

`max_compensation` caps f (the paper uses 2 to reduce variance); any cap below k/budget biases both
policies. With budget >= k every chunk is selected with f = 1, which is SeCO exactly.

Samplers draw from their own seeded `torch.Generator`, never from the global RNG, so selection does not
change dropout masks or data order, and their state can be saved and restored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkSelection:
    """The chunks stage 2 backpropagates in one step.

    Attributes:
        chunks: selected chunk indices, ascending.
        compensation: factor applied to each selected chunk's loss and KV-gradient relay.
    """

    chunks: tuple[int, ...]
    compensation: float


def select_all(num_chunks: int) -> ChunkSelection:
    """Every chunk, factor 1: SeCO."""
    return ChunkSelection(tuple(range(num_chunks)), 1.0)


class ChunkSampler(ABC):
    """A seeded, reproducible selection policy. Subclass it to plug a custom policy into `SpaCO`.

    A subclass implements `_draw(num_chunks)` (ascending chunk indices) and sets `name`, which tags its
    saved state.
    """

    name = ""

    def __init__(self, *, budget: int, max_compensation: float | None = None, seed: int = 0):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive integer (chunks backpropagated per step), got {budget!r}")
        if max_compensation is not None and not (
            isinstance(max_compensation, (int, float)) and math.isfinite(max_compensation) and max_compensation >= 1
        ):
            raise ValueError(
                f"max_compensation must be a number >= 1 (a factor below 1 would shrink the gradient), or None "
                f"for no cap; got {max_compensation!r}"
            )
        self.budget = budget
        self.max_compensation = None if max_compensation is None else float(max_compensation)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, num_chunks: int) -> ChunkSelection:
        """Draw the chunks to backpropagate for a sequence of `num_chunks` chunks."""
        if self.budget >= num_chunks:
            return select_all(num_chunks)
        chunks = tuple(int(c) for c in self._draw(num_chunks))
        if any(b <= a for a, b in zip(chunks, chunks[1:])) or any(not 0 <= c < num_chunks for c in chunks):
            raise ValueError(
                f"{type(self).__name__}._draw({num_chunks}) returned {chunks}: a selection must be strictly "
                f"ascending chunk indices in [0, {num_chunks})"
            )
        return ChunkSelection(chunks, self._cap(num_chunks / self.budget))

    @abstractmethod
    def _draw(self, num_chunks: int) -> tuple[int, ...]: ...

    def _cap(self, factor: float) -> float:
        return factor if self.max_compensation is None else min(factor, self.max_compensation)

    @property
    def policy(self) -> str:
        return self.name or type(self).__name__

    def state_dict(self) -> dict:
        return {"policy": self.policy, "budget": self.budget, "seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state: the following selections replay those after the save."""
        if state.get("policy") != self.policy:
            raise ValueError(f"sampler state is for policy {state.get('policy')!r}, this sampler is {self.policy!r}")
        if state.get("budget") != self.budget:
            raise ValueError(f"sampler state was saved with budget {state.get('budget')}, this sampler has {self.budget}")
        self.generator.set_state(state["generator"])
        self.seed = state.get("seed", self.seed)


class UniformSampler(ChunkSampler):
    """Exactly `budget` distinct chunks, uniformly at random (the paper's policy)."""

    name = "uniform"

    def _draw(self, num_chunks: int) -> tuple[int, ...]:
        picked = torch.randperm(num_chunks, generator=self.generator)[: self.budget]
        return tuple(sorted(picked.tolist()))


class BernoulliSampler(ChunkSampler):
    """Each chunk independently with probability budget / k: exactly unbiased."""

    name = "bernoulli"

    def _draw(self, num_chunks: int) -> tuple[int, ...]:
        keep = torch.rand(num_chunks, generator=self.generator) < self.budget / num_chunks
        return tuple(keep.nonzero().flatten().tolist())


SAMPLERS = {cls.name: cls for cls in (UniformSampler, BernoulliSampler)}


def make_sampler(sampling, *, budget: int | None, max_compensation: float | None, seed: int | None) -> ChunkSampler:
    """A sampler from a policy name (`uniform`, `bernoulli`) or a ready `ChunkSampler` instance.

    With an instance, the other options belong to it: giving different ones here is an error rather
    than being silently ignored.
    """
    if isinstance(sampling, ChunkSampler):
        given = {"budget": budget, "max_compensation": max_compensation, "seed": seed}
        for option, value in given.items():
            if value is not None and value != getattr(sampling, option):
                raise ValueError(
                    f"{option}={value!r} conflicts with the sampler instance's {option}="
                    f"{getattr(sampling, option)!r}; set it on the sampler, not on SpaCO"
                )
        return sampling
    if sampling not in SAMPLERS:
        raise ValueError(f"unknown sampling policy {sampling!r}; choose one of {', '.join(map(repr, SAMPLERS))}")
    if budget is None:
        raise ValueError("budget is required: how many chunks SpaCO backpropagates per step")
    return SAMPLERS[sampling](budget=budget, max_compensation=max_compensation, seed=0 if seed is None else seed)
