"""The objective contract (what each chunk backpropagates) and cross-entropy, its first case; the checks
every objective shares. See `chunkwise.core.objectives` for the two families."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chunkwise.core.batch import ChunkedBatch
from chunkwise.core.handle import CausalLMHandle
from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum
from chunkwise.core.reference import resolve_reference


@dataclass(frozen=True)
class Policy:
    """The model being trained, as the engine sees it; objectives use it for reference passes and checks.

    Attributes:
        model: the model as the caller gave it to the engine (DDP / PEFT wrappers included).
        handle: `inspect_causal_lm(model)`.
        chunk_size: the engine's chunk size (the reference pass uses it too).
    """

    model: torch.nn.Module
    handle: CausalLMHandle
    chunk_size: int


# ----- the engine's side of the contract ---------------------------------------------------------------


class BoundObjective(ABC):
    """An objective applied to one batch: what the engine calls, chunk by chunk.

    Subclasses set `batch` (the `ChunkedBatch`) and implement `span_loss`.
    """

    batch: ChunkedBatch

    needs_stage_1_logits = False
    """Stage 1 runs the LM head on every chunk (the last one too) and hands the logits to `observe`."""
    loss_is_chunk_sum = True
    """The reported loss is the sum of `chunk_loss` over the chunks; otherwise it is `value()`."""
    zero_gradient_is_error = False
    """A step that backpropagates targets yet leaves every trainable gradient zero is an error (the engine's
    guard, `chunkwise.core.gradient_guard`); False where a zero gradient is a legitimate outcome."""

    def observe(self, chunk: int, logits: torch.Tensor) -> None:
        """Stage 1, no autograd: chunk `chunk`'s logits `[B, c, V]` (only if `needs_stage_1_logits`)."""

    def finish_stage_1(self) -> None:
        """Called once after stage 1, before stage 2."""

    def chunk_loss(self, chunk: int, logits: torch.Tensor) -> torch.Tensor:
        """The scalar chunk `chunk` backpropagates, from its logits `[B, c, V]` (stage 2, with autograd)."""
        start, end = self.batch.bounds[chunk]
        return self.span_loss(start, end, logits)

    @abstractmethod
    def span_loss(self, start: int, end: int, logits: torch.Tensor) -> torch.Tensor:
        """`chunk_loss` of the tokens `[start, end)`, whose logits `[B, end - start, V]` are given."""

    def full_sequence_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss from one ordinary forward's logits `[B, T, V]`, differentiable (`--method full`)."""
        return self.span_loss(0, logits.shape[1], logits)

    def value(self) -> torch.Tensor:
        """The loss, when it is not the sum of the chunk losses (sequence-level objectives)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra per-batch statistics for logs (e.g. DPO's reward margin); empty by default."""
        return {}


class Objective(ABC):
    """A training loss the engines can split into chunks. Pass one as `engine.backward(..., objective=...)`."""

    name = "objective"
    zero_gradient_is_error = False
    """Whether a step that backpropagates targets and leaves every trainable gradient zero is an error (the
    engine's guard, `chunkwise.core.gradient_guard`); False where a zero gradient can be legitimate (GRPO when
    every group's rewards tie, custom losses)."""

    @abstractmethod
    def bind(self, batch: ChunkedBatch, *, num_items: float | None, policy: Policy) -> BoundObjective:
        """Check the objective against `batch` (before any model call) and prepare it for the two stages.

        Args:
            batch: the validated, chunked batch.
            num_items: what the summed loss is divided by, in the objective's own unit (tokens, rows,
                pairs), when the caller gives it (gradient accumulation, several processes); None: the
                objective's default for this batch.
            policy: the model being trained.
        """


# ----- cross-entropy: the engines' default ---------------------------------------------------------------


class CrossEntropy(Objective):
    """Next-token cross-entropy summed over the valid targets and divided by `num_items` (default: their
    number) — what `engine.backward` computes when no objective is given."""

    name = "cross-entropy"
    zero_gradient_is_error = True

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        return BoundCrossEntropy(batch)


class BoundCrossEntropy(BoundObjective):
    """Cross-entropy bound to a batch: the summed token loss of a span over the batch normaliser."""

    # -log p has gradient p - onehot: zero only if every target has probability exactly 1.
    zero_gradient_is_error = True

    def __init__(self, batch: ChunkedBatch):
        self.batch = batch

    def span_loss(self, start, end, logits):
        return chunk_loss_sum(logits, self.batch.targets[:, start:end]) / self.batch.normaliser


# ----- checks shared by the objectives ------------------------------------------------------------------


def check_number(owner: str, name: str, value, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ValueError(f"{owner}: {name} must be a finite number {relation} {low:g}, got {value!r}")
    return float(value)


def check_rows_have_targets(owner: str, batch: ChunkedBatch, counts: torch.Tensor) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{owner}: row {empty[0]} of the batch has no response token (every label after the shift is -100); "
            "each sequence needs at least one target token after its prompt: drop it, or shorten its prompt"
        )


def per_token_tensor(owner: str, name: str, value, batch: ChunkedBatch, valid: torch.Tensor) -> torch.Tensor:
    """`value` `[B, T]` aligned with the labels (or `[B]`, one per row) -> `[B, T]` aligned with the targets.

    Non-finite entries at target positions are refused; entries elsewhere are set to 0 (never used).
    """
    rows, length = batch.targets.shape
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor of shape [{rows}, {length}] or [{rows}], got {type(value).__name__}"
                        + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else ""))
    if tuple(value.shape) not in ((rows, length), (rows,)):
        raise ValueError(
            f"{owner}: {name} must be [batch, seq_len] = [{rows}, {length}], aligned with labels (entry t belongs to "
            f"the token labels[:, t] names), or [{rows}] (one value per row); got {list(value.shape)}"
        )
    value = value.detach().to(batch.targets.device)
    aligned = value.unsqueeze(1).expand(rows, length) if value.dim() == 1 else F.pad(value[:, 1:], (0, 1))
    bad = valid & ~torch.isfinite(aligned)
    if bad.any():
        row, position = bad.nonzero()[0].tolist()
        raise ValueError(f"{owner}: {name} is not finite at row {row}, position {position + 1} (a target token)")
    return aligned.masked_fill(~valid, 0.0)


def reference_logps_for(owner: str, reference, batch: ChunkedBatch, policy: Policy, *, per_token: bool):
    """Checked reference: log-probs `[B, T]` target-aligned (`per_token`) or `[B]` row sums (float64) when
    given as a tensor, a `ReferenceModel` to run, or None. Runs no model."""
    if reference is None:
        return None
    if isinstance(reference, torch.Tensor):
        if per_token:
            return per_token_tensor(owner, "reference log-probs", reference, batch, batch.targets != IGNORE_INDEX)
        rows = batch.targets.shape[0]
        if not reference.is_floating_point() or tuple(reference.shape) != (rows,):
            raise ValueError(
                f"{owner}: precomputed reference log-probs must be a float tensor [{rows}], each row's summed log-probability "
                f"of its targets under the reference, in the batch's row order; got {list(reference.shape)} {reference.dtype}"
            )
        return reference.detach().to(batch.targets.device, torch.float64)
    return resolve_reference(reference, policy.model, policy.handle, owner=owner)


# ----- token-local losses ------------------------------------------------------------------------------------


# ----- sequence-level losses ------------------------------------------------------------------------------------


"""Objectives `chunkwise train --objective` can build from data alone (GRPO needs rewards from generation)."""
