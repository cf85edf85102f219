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

* `adaptive` (ours): decides in stage 2, chunk by chunk, from what is known there (`AdaptiveSampler`):
  exactly unbiased, a chunk holding most of the step's targets is never dropped, budget chunks on average.

Samplers draw from their own seeded `torch.Generator`, never from the global RNG, so selection does not
change dropout masks or data order, and their state can be saved and restored.

Stage 2 consults a `StepPlan` per step, from the last chunk to the first: `uniform` and `bernoulli` draw
their selection before stage 1 (`FixedPlan`); `adaptive` decides each chunk when stage 2 reaches it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class StageTwoState:
    """What stage 2 knows when it reaches a chunk: what a policy deciding there may use.

    Attributes:
        target_counts: `[k]` valid targets in each chunk (the batch's, known before stage 1).
        relay_norms: returns `[k]` float64 (CPU): the L2 norm of the KV gradient relayed so far into each
            chunk (for the chunk being decided, and every later one, that relay is complete). Computed on
            call: a policy that does not ask costs nothing.
        agree: `(sums [n], draw) -> (sums, draw)`: under a distributed engine that runs every chunk on every
            rank (ZeRO-3), `sums` summed over ranks and rank 0's `draw`, so all ranks decide alike;
            elsewhere the identity.
    """

    target_counts: tuple[int, ...]
    relay_norms: Callable[[], torch.Tensor]
    agree: Callable[[torch.Tensor, float], tuple[torch.Tensor, float]] = lambda sums, draw: (sums, draw)


class StepPlan(ABC):
    """One step's chunk decisions; stage 2 asks `decide` for each chunk, from the last to the first.

    Attributes:
        online: the decisions depend on what stage 2 learns, so stage 1 cannot know which chunks it skips.
        final_chunk: the last chunk stage 2 may visit (the one whose backward ends a distributed step).
    """

    online = False
    final_chunk = 0

    @abstractmethod
    def decide(self, chunk: int, state: StageTwoState) -> float | None:
        """The factor chunk `chunk`'s loss and relay are scaled by if it is backpropagated, None if not."""

    def may_skip(self, chunk: int) -> bool:
        """Whether stage 2 might not visit `chunk` (stage 1 then reports its loss)."""
        return True


class FixedPlan(StepPlan):
    """A selection drawn before stage 1, one factor for all its chunks (`uniform`, `bernoulli`, SeCO)."""

    def __init__(self, selection: ChunkSelection):
        self.selection = selection
        self.final_chunk = selection.chunks[0] if selection.chunks else 0

    def decide(self, chunk: int, state: StageTwoState) -> float | None:
        return self.selection.compensation if chunk in self.selection.chunks else None

    def may_skip(self, chunk: int) -> bool:
        return chunk not in self.selection.chunks


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

    def plan(self, num_chunks: int) -> StepPlan:
        """This step's decisions for a sequence of `num_chunks` chunks (a selection drawn now, by default)."""
        return FixedPlan(self.select(num_chunks))

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


# ----- decisions in stage 2 -------------------------------------------------------------------------------

GOLDEN = (math.sqrt(5) - 1) / 2  # the step increment of the stratified draws: the most evenly spread sequence


class AdaptivePlan(StepPlan):
    """One step of `adaptive`: chunk j is kept with probability q_j computed when stage 2 reaches it.

    q_j = min(1, f + spare_j * s_j / sum_{i<=j} s_i), where
      * s_i = a_i + λ A_j * r_i / sum_{i'<=j} r_i' is chunk i's share of what is left to backpropagate: a_i, its
        share of the step's targets (its own loss), plus the share A_j = sum_{i>j} a_i of the loss already
        visited, which can reach chunk i only through the relay, split by the relay's norm r_i so far, and
        weighted by λ = `carried_weight` (1 by default: the relay carries as much as the visited loss);
      * f = floor * t / k bounds every factor 1/q_j by k / (floor * t);
      * spare_j = t - sum_{i>j} q_i - (j + 1) f: the budget later decisions left, less a floor f kept for
        chunk j and each chunk before it. So sum_j q_j <= t on every path: at most t chunks are
        backpropagated on average.
    A chunk with no target and no relay contributes nothing: q = 0, it is skipped and costs no budget.
    Unbiased whatever q is (docs/spaco.md): a kept chunk's loss and relay are scaled by 1/q_j, and what
    q_j depends on (targets, relay, earlier decisions) is known before its draw.

    Attributes:
        trace: `(chunk, q, kept)` for each chunk decided, in stage 2's order.
    """

    online = True

    def __init__(self, *, budget: int, num_chunks: int, floor: float, draws: torch.Tensor, carried_weight: float = 1.0):
        self.budget, self.num_chunks, self.draws = budget, num_chunks, draws
        self.floor = floor * budget / num_chunks
        self.carried_weight = carried_weight
        self.committed = 0.0  # sum of q over the chunks decided so far: their expected cost
        self.trace: list[tuple[int, float, bool]] = []

    def probability(self, chunk: int, counts: torch.Tensor, relay: torch.Tensor) -> float:
        """q for `chunk`, from targets `counts` `[k]` and relay norms `relay` `[k]` (float64)."""
        total = counts.sum()
        own = counts / total if total > 0 else torch.zeros_like(counts)
        past = relay[: chunk + 1]
        visited = self.carried_weight * own[chunk + 1 :].sum()
        carried = visited * past / past.sum() if past.sum() > 0 else torch.zeros_like(past)
        score = own[: chunk + 1] + carried
        if score[chunk] <= 0:
            return 0.0
        spare = max(0.0, self.budget - self.committed - (chunk + 1) * self.floor)
        return min(1.0, self.floor + spare * float(score[chunk] / score.sum()))

    def decide(self, chunk: int, state: StageTwoState) -> float | None:
        counts = torch.tensor(state.target_counts, dtype=torch.float64)
        sums, draw = state.agree(torch.cat([counts, state.relay_norms().square()]), float(self.draws[chunk]))
        q = self.probability(chunk, sums[: self.num_chunks], sums[self.num_chunks :].sqrt())
        self.committed += q
        kept = q >= 1.0 or (q > 0.0 and self._keep(chunk, q, draw))
        self.trace.append((chunk, q, kept))
        return 1.0 / q if kept else None

    def _keep(self, chunk: int, q: float, draw: float) -> bool:
        """The draw: keep with probability q (tests replace it to walk every decision path)."""
        return draw < q


class AdaptiveSampler(ChunkSampler):
    """Decides each chunk in stage 2 from its targets and its relay: unbiased, budget chunks on average.

    Args:
        budget: t, the expected number of chunks backpropagated per step is at most t.
        seed: seed of the draws.
        floor: every q is at least floor * t / k, so every factor is at most k / (floor * t); in (0, 1].
        stratify: True: chunk j's draw at step s is frac(o_j + s * golden ratio) with o_j uniform, drawn once:
            uniform at each step (so each step stays unbiased), spread evenly across steps (a chunk kept with
            probability q is kept about every 1/q steps, not at geometric gaps). False: fresh draws each step.
        carried_weight: λ in (0, 1], the weight of the visited loss's share that the relay carries (s_i above).
            1 (default): the relay is scored as carrying all of it. Below 1, chunks' own targets weigh more
            than the relay: on language-model data (every token a target, the gradient mostly local) q stays
            near t/k instead of following the relay's uneven norms, which lowers the estimate's variance
            (docs/spaco/adaptive/dense_diagnosis.json, one dense batch at a trained model: relative RMS error
            1.620 at λ = 1, 1.553 at 0.25, 1.538 at 0.1; `bernoulli` 1.531). Where the chunks still to decide
            hold no targets (targets at the end) only ratios of carried scores matter, so λ changes nothing
            there (recall: 0.130 at every λ). λ > 0 keeps q > 0 on a chunk with a relay and no target
            (unbiased for every λ). Not the default: trained on the dense task (docs/spaco.md, 3 seeds) λ = 0.1
            ended at held-out loss 2.117 / 2.117 / 2.110 against λ = 1's 2.106 / 2.110 / 2.114 (SeCO 2.105):
            the lower one-batch error did not show in training.
    """

    name = "adaptive"
    plan_class = AdaptivePlan

    def __init__(self, *, budget: int, max_compensation: float | None = None, seed: int = 0, floor: float = 0.25,
                 stratify: bool = True, carried_weight: float = 1.0):
        super().__init__(budget=budget, seed=seed)
        if max_compensation is not None:
            raise ValueError("sampling='adaptive' bounds its factors with `floor` (at most k / (floor * budget)); a "
                             "max_compensation cap would bias it: leave max_compensation unset")
        if not (isinstance(floor, (int, float)) and 0 < floor <= 1):
            raise ValueError(f"floor must be in (0, 1] (the least q, as a fraction of budget / chunks); got {floor!r}")
        if isinstance(carried_weight, bool) or not (isinstance(carried_weight, (int, float)) and 0 < carried_weight <= 1):
            raise ValueError(f"carried_weight must be in (0, 1] (0 would give q = 0 to a chunk whose only gradient is "
                             f"its relay: biased); got {carried_weight!r}")
        self.floor, self.stratify, self.carried_weight = float(floor), stratify, float(carried_weight)
        self.offsets = torch.empty(0, dtype=torch.float64)  # o_j, drawn when a sequence first has chunk j
        self.steps = 0
        self.last_plan: StepPlan | None = None

    def plan(self, num_chunks: int) -> StepPlan:
        if self.budget >= num_chunks:
            self.last_plan = FixedPlan(select_all(num_chunks))
            return self.last_plan
        self.last_plan = self.plan_class(budget=self.budget, num_chunks=num_chunks, floor=self.floor,
                                         draws=self._draws(num_chunks), carried_weight=self.carried_weight)
        return self.last_plan

    def _draws(self, num_chunks: int) -> torch.Tensor:
        """`[k]` uniform draws for this step, one per chunk, independent of each other."""
        if not self.stratify:
            return torch.rand(num_chunks, generator=self.generator, dtype=torch.float64)
        if len(self.offsets) < num_chunks:
            extra = torch.rand(num_chunks - len(self.offsets), generator=self.generator, dtype=torch.float64)
            self.offsets = torch.cat([self.offsets, extra])
        self.steps += 1
        return torch.frac(self.offsets[:num_chunks] + (self.steps - 1) * GOLDEN)

    def _draw(self, num_chunks: int) -> tuple[int, ...]:
        raise TypeError("sampling='adaptive' decides in stage 2 (plan()), not before it: it has no select()")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offsets": self.offsets.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.offsets, self.steps = state["offsets"].clone(), state["steps"]


SAMPLERS = {cls.name: cls for cls in (UniformSampler, BernoulliSampler, AdaptiveSampler)}


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
