"""Training objectives: what each chunk backpropagates (DESIGN.md §3, "Growing the house").

An objective tells the engine two things: what stage 1 must collect (nothing, or every chunk's
logits), and what chunk j backpropagates in stage 2 (a scalar built from chunk j's logits alone).
Two families are exactly decomposable that way:

* **Token-local** (`CrossEntropy`, `TokenLoss`, `GRPO`): L = Σ_{b,t} c_{b,t} · ℓ(log p_{b,t}, extras_{b,t})
  over the valid targets, with weights c (the normalisation) fixed before any model call. Chunk j
  backpropagates its own tokens' terms; their sum over chunks is L. Stage 1 collects nothing.
* **Sequence-level** (`SequenceLoss`, `DPO`, `IPO`, `SimPO`): L = f(s_1, …, s_N) where s_b = Σ_t log p_{b,t}
  is row b's summed target log-probability. Stage 1 (no autograd) runs the LM head on every chunk and
  adds up each s_b; then w_b = ∂L/∂s_b (autograd through f on N scalars). Chunk j backpropagates
  Σ_b w_b Σ_{t in chunk j} log p_{b,t}; summed over the chunks its gradient is Σ_b w_b ∇s_b = ∇L, exactly.

Reference log-probs (DPO, IPO, GRPO's KL term) come precomputed as tensors, or from a no-grad chunked
pass of a reference model run before stage 1 (`chunkwise.core.reference`).

**SpaCO.** Token-local objectives are compensated like cross-entropy: `bernoulli` stays exactly unbiased,
`uniform` keeps its small bias for long dependency chains. For sequence-level objectives stage 1 still
visits every chunk (with the LM head: SpaCO's stage 1 costs a full forward here), so L and the weights
w_b are exact; SpaCO then samples the chunks of the token-local sum Σ_b w_b Σ_t log p_{b,t}, so
`bernoulli` is an exactly unbiased estimate of ∇L (given the exact w_b) and `uniform` has the same bias
as for cross-entropy. The reported loss is the exact L either way.

Per-token tensors (advantages, old log-probs, reference log-probs, …) are `[B, T]` *aligned with the
labels*: entry t belongs to the token `labels[:, t]` names (the prediction made at position t-1), so
they are shifted and cut into chunks together with the labels. A per-row value may be given as `[B]`.

Every check runs when the objective is bound to a batch, before any model call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chunkwise.core.batch import ChunkedBatch
from chunkwise.core.handle import CausalLMHandle
from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, target_logps
from chunkwise.core.reference import reference_token_logps, resolve_reference

NORMALIZATIONS = ("token", "sequence", "fixed")


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

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        return BoundCrossEntropy(batch)


class BoundCrossEntropy(BoundObjective):
    """Cross-entropy bound to a batch: the summed token loss of a span over the batch normaliser."""

    def __init__(self, batch: ChunkedBatch):
        self.batch = batch

    def span_loss(self, start, end, logits):
        return chunk_loss_sum(logits, self.batch.targets[:, start:end]) / self.batch.normaliser


# ----- checks shared by the objectives ------------------------------------------------------------------


def _check_number(owner: str, name: str, value, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ValueError(f"{owner}: {name} must be a finite number {relation} {low:g}, got {value!r}")
    return float(value)


def _check_rows_have_targets(owner: str, batch: ChunkedBatch, counts: torch.Tensor) -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{owner}: row {empty[0]} of the batch has no response token (every label after the shift is -100); "
            "each sequence needs at least one target token after its prompt: drop it, or shorten its prompt"
        )


def _per_token_tensor(owner: str, name: str, value, batch: ChunkedBatch, valid: torch.Tensor) -> torch.Tensor:
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


def _resolve_reference(owner: str, reference, batch: ChunkedBatch, policy: Policy, *, per_token: bool):
    """Checked reference: log-probs `[B, T]` target-aligned (`per_token`) or `[B]` row sums (float64) when
    given as a tensor, a `ReferenceModel` to run, or None. Runs no model."""
    if reference is None:
        return None
    if isinstance(reference, torch.Tensor):
        if per_token:
            return _per_token_tensor(owner, "reference log-probs", reference, batch, batch.targets != IGNORE_INDEX)
        rows = batch.targets.shape[0]
        if not reference.is_floating_point() or tuple(reference.shape) != (rows,):
            raise ValueError(
                f"{owner}: precomputed reference log-probs must be a float tensor [{rows}], each row's summed log-probability "
                f"of its targets under the reference, in the batch's row order; got {list(reference.shape)} {reference.dtype}"
            )
        return reference.detach().to(batch.targets.device, torch.float64)
    return resolve_reference(reference, policy.model, policy.handle, owner=owner)


# ----- token-local losses ------------------------------------------------------------------------------------


class TokenLoss(Objective):
    """A token-local loss: L = Σ_{b,t} c_{b,t} · fn(log p, **values)_{b,t} over the valid targets.

    Example (plain cross-entropy, per-token weighted):
        loss = TokenLoss(lambda logps, weight: -weight * logps, weight=token_weights)   # [B, T] weights

    Args:
        fn: `fn(logps, **values) -> [B, c]` per-token loss of one chunk: `logps` `[B, c]` the target
            log-probabilities (with autograd), each value `[B, c]` cut from its tensor.
        normalization: the weights c:
            "token": 1 / num_items (default num_items: the batch's valid targets);
            "sequence": 1 / (n_b · num_items), n_b row b's targets (default num_items: the rows) — the mean
                over rows of each row's mean;
            "fixed": 1 / (max_length · num_items) (default num_items: the rows) — a constant, Dr. GRPO's.
        max_length: the constant of "fixed" (e.g. the maximum completion length).
        reference: reference log-probs passed to `fn` as `reference_logps`: a tensor `[B, T]` aligned with
            labels, a reference model, `chunkwise.reference.ADAPTER_DISABLED` or a `ReferenceModel`.
        temperature: the logits are divided by it before the softmax (GRPO samples at a temperature).
        allow_empty_rows: a row without a target is an error (default); True lets it contribute nothing.
        **values: per-token tensors `[B, T]` aligned with labels, or `[B]` per row.
    """

    name = "token loss"

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        *,
        normalization: str = "token",
        max_length: int | None = None,
        reference=None,
        temperature: float = 1.0,
        allow_empty_rows: bool = False,
        **values: torch.Tensor,
    ):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{self.name}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "fixed":
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"{self.name}: normalization='fixed' divides by max_length: give a positive integer, got {max_length!r}")
        elif max_length is not None:
            raise ValueError(f"{self.name}: max_length only applies to normalization='fixed'")
        self.fn = fn
        self.normalization = normalization
        self.max_length = max_length
        self.reference = reference
        self.temperature = _check_number(self.name, "temperature", temperature, strict=True)
        self.allow_empty_rows = allow_empty_rows
        self.values = values

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        valid = batch.targets != IGNORE_INDEX
        counts = valid.sum(dim=1)
        if not self.allow_empty_rows:
            _check_rows_have_targets(self.name, batch, counts)
        values = {name: _per_token_tensor(self.name, name, value, batch, valid) for name, value in self.values.items() if value is not None}
        reference = _resolve_reference(self.name, self.reference, batch, policy, per_token=True)
        weights = self._weights(valid, counts, num_items)
        if reference is not None and not isinstance(reference, torch.Tensor):
            reference = reference_token_logps(reference, batch, chunk_size=policy.chunk_size, temperature=self.temperature)
        if reference is not None:
            values["reference_logps"] = reference
        return _BoundTokenLoss(self.fn, batch, weights, values, self.temperature)

    def _weights(self, valid: torch.Tensor, counts: torch.Tensor, num_items) -> torch.Tensor:
        """c `[B, T]` (float64, 0 at ignored targets)."""
        rows = valid.shape[0]
        if self.normalization == "token":
            per_row = torch.full((rows,), 1.0 / (max(int(counts.sum()), 1) if num_items is None else float(num_items)), dtype=torch.float64)
        elif self.normalization == "sequence":
            per_row = 1.0 / (counts.clamp(min=1).double().cpu() * (rows if num_items is None else float(num_items)))
        else:
            per_row = torch.full((rows,), 1.0 / (self.max_length * (rows if num_items is None else float(num_items))), dtype=torch.float64)
        return torch.where(valid, per_row.to(valid.device).unsqueeze(1), 0.0)


class _BoundTokenLoss(BoundObjective):
    def __init__(self, fn, batch: ChunkedBatch, weights: torch.Tensor, values: dict, temperature: float):
        self.fn, self.batch, self.weights, self.values, self.temperature = fn, batch, weights, values, temperature

    def span_loss(self, start, end, logits):
        targets = self.batch.targets[:, start:end]
        logps = target_logps(logits, targets, temperature=self.temperature)
        per_token = self.fn(logps, **{name: value[:, start:end].to(logps.dtype) for name, value in self.values.items()})
        # `where`, not a product with the weights: a per-token loss undefined at an ignored position
        # (say inf) must not turn into NaN there.
        return torch.where(targets != IGNORE_INDEX, per_token * self.weights[:, start:end].to(per_token.dtype), 0.0).sum()


def grpo_token_loss(
    logps, *, advantages, old_logps=None, reference_logps=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None,
    kl_ratio_weighted=False,
):
    """GRPO's per-token loss (Shao et al. 2024, with DAPO's asymmetric clip and optional two-sided clip).

        r = exp(log p − log p_old),  loss = −min(r' A, clip(r, 1 − ε_low, 1 + ε_high) A) + β KL,
        r' = min(r, δ) when `delta` is set, KL = exp(ref − log p) − (ref − log p) − 1 (the k3 estimator),
        multiplied by r when `kl_ratio_weighted` (DeepSeek-V3.2's unbiased KL gradient; TRL's default).

    `old_logps` None: the log-probs of the policy itself, detached (one update per generation: r = 1).
    All tensors `[B, c]`; returns `[B, c]`.
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(capped * advantages, clipped * advantages)
    if beta != 0.0:
        gap = reference_logps - logps
        kl = torch.exp(gap) - gap - 1
        loss = loss + beta * (kl * ratio if kl_ratio_weighted else kl)
    return loss


class GRPO(TokenLoss):
    """Group Relative Policy Optimization's clipped surrogate, with an optional KL term to a reference.

    The batch holds the prompt + completion sequences (labels -100 on prompt and padding); the
    completions' tokens are the targets.

    Args:
        advantages: `[B]` one per sequence (GRPO's group-normalised reward), or `[B, T]` per token.
        old_logps: `[B, T]` log-probs of the sampling policy (aligned with labels); None: the current
            policy's, detached (one gradient step per generation).
        reference: for the KL term (needs beta > 0): `[B, T]` reference log-probs, a reference model,
            `ADAPTER_DISABLED` or a `ReferenceModel`.
        beta: KL coefficient (0: no KL term, no reference needed).
        epsilon, epsilon_high: clip range [1 − epsilon, 1 + epsilon_high] (epsilon_high defaults to epsilon).
        delta: optional upper bound on the unclipped ratio (two-sided clipping).
        kl_ratio_weighted: multiply the KL term by the ratio r (DeepSeek-V3.2; TRL's use_bias_correction_kl).
        normalization: "sequence" (the GRPO paper: mean over sequences of each one's token mean),
            "token" (sum over the batch's completion tokens / their number: DAPO, TRL's bnpo) or
            "fixed" (sum / (rows · max_length): Dr. GRPO). num_items replaces the number of rows
            ("sequence", "fixed") or tokens ("token") for gradient accumulation.
        max_length: the constant of "fixed" (the maximum completion length).
        temperature: the sampling temperature; logits are divided by it.
        allow_empty_rows: False (default): a sequence without completion tokens is an error; True: it
            contributes nothing (TRL's masked truncated completions).
    """

    name = "GRPO"

    def __init__(
        self,
        *,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None = None,
        reference=None,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        kl_ratio_weighted: bool = False,
        normalization: str = "sequence",
        max_length: int | None = None,
        temperature: float = 1.0,
        allow_empty_rows: bool = False,
    ):
        if advantages is None:
            raise ValueError(f"{self.name}: advantages are required ([B] per sequence or [B, T] per token)")
        beta = _check_number(self.name, "beta", beta)
        if beta > 0 and reference is None:
            raise ValueError(f"{self.name}: beta={beta:g} weighs a KL term to a reference; give reference= (log-probs, a model or 'adapter-disabled') or set beta=0")
        if beta == 0 and reference is not None:
            raise ValueError(f"{self.name}: a reference is only used by the KL term; set beta > 0, or drop reference")
        epsilon_low = _check_number(self.name, "epsilon", epsilon)
        epsilon_high = epsilon_low if epsilon_high is None else _check_number(self.name, "epsilon_high", epsilon_high)
        if delta is not None:
            delta = _check_number(self.name, "delta", delta, low=1.0)
        settings = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, kl_ratio_weighted=kl_ratio_weighted)
        super().__init__(
            lambda logps, **values: grpo_token_loss(logps, **values, **settings),
            normalization=normalization, max_length=max_length, reference=reference, temperature=temperature,
            allow_empty_rows=allow_empty_rows, advantages=advantages, old_logps=old_logps,
        )


# ----- sequence-level losses ------------------------------------------------------------------------------------


class SequenceLoss(Objective):
    """A sequence-level loss: L = Σ fn(logps, lengths, reference_logps) / num_items.

    Args:
        fn: `fn(logps, lengths, reference_logps) -> tensor` of per-example losses (any shape), where
            `logps` `[N]` is each row's summed target log-probability (float64, with autograd), `lengths`
            `[N]` its number of targets (float64) and `reference_logps` `[N]` the reference's sums, or None.
            The default num_items is the number of elements fn returns (so the loss is their mean).
        reference: a tensor `[N]` of precomputed row sums, a reference model, `ADAPTER_DISABLED`, a
            `ReferenceModel`, or None (reference-free losses).
        temperature: the logits are divided by it before the softmax.
    """

    name = "sequence loss"

    def __init__(self, fn: Callable[..., torch.Tensor], *, reference=None, temperature: float = 1.0):
        self.fn = fn
        self.reference = reference
        self.temperature = _check_number(self.name, "temperature", temperature, strict=True)

    def check_batch(self, batch: ChunkedBatch) -> None:
        """Batch-layout checks of a subclass (e.g. chosen/rejected pairing); raise ValueError."""

    def describe(self, logps: torch.Tensor, lengths: torch.Tensor, reference_logps: torch.Tensor | None) -> dict[str, float]:
        """Statistics for logs from the exact row sums (no autograd); none by default."""
        return {}

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        self.check_batch(batch)
        counts = (batch.targets != IGNORE_INDEX).sum(dim=1)
        _check_rows_have_targets(self.name, batch, counts)
        reference = _resolve_reference(self.name, self.reference, batch, policy, per_token=False)
        if reference is not None and not isinstance(reference, torch.Tensor):
            tokens = reference_token_logps(reference, batch, chunk_size=policy.chunk_size, temperature=self.temperature)
            reference = tokens.sum(dim=1)
        return _BoundSequenceLoss(self, batch, counts.double(), reference, num_items)


class _BoundSequenceLoss(BoundObjective):
    needs_stage_1_logits = True
    loss_is_chunk_sum = False

    def __init__(self, objective: SequenceLoss, batch: ChunkedBatch, lengths, reference, num_items):
        self.objective, self.batch, self.lengths, self.reference, self.num_items = objective, batch, lengths, reference, num_items
        self.sums = torch.zeros(batch.targets.shape[0], dtype=torch.float64, device=batch.targets.device)
        self.dtype = None
        self.total = self.row_weights = None

    def observe(self, chunk, logits):
        start, end = self.batch.bounds[chunk]
        logps = target_logps(logits, self.batch.targets[:, start:end], temperature=self.objective.temperature)
        self.sums += logps.sum(dim=1).double()
        self.dtype = logps.dtype

    def _loss(self, sums: torch.Tensor) -> torch.Tensor:
        losses = self.objective.fn(sums, self.lengths, self.reference)
        return losses.sum() / (losses.numel() if self.num_items is None else float(self.num_items))

    def finish_stage_1(self):
        sums = self.sums.clone().requires_grad_(True)
        with torch.enable_grad():
            total = self._loss(sums)
            (weights,) = torch.autograd.grad(total, sums, allow_unused=True)
        self.total = total.detach()
        self.row_weights = torch.zeros_like(self.sums) if weights is None else weights  # w_b = dL/ds_b

    def span_loss(self, start, end, logits):
        logps = target_logps(logits, self.batch.targets[:, start:end], temperature=self.objective.temperature)
        return (logps * self.row_weights.to(logps.dtype).unsqueeze(1)).sum()

    def full_sequence_loss(self, logits):
        logps = target_logps(logits, self.batch.targets, temperature=self.objective.temperature)
        self.sums, self.dtype = logps.detach().sum(dim=1).double(), logps.dtype  # for metrics()
        return self._loss(logps.sum(dim=1).double()).to(logps.dtype)

    def value(self):
        return self.total.to(self.dtype)

    def metrics(self):
        return self.objective.describe(self.sums, self.lengths, self.reference)


class PairedLoss(SequenceLoss):
    """A preference loss over (chosen, rejected) pairs; the batch holds the B chosen sequences, then the B
    rejected ones in the same order (TRL's layout: `torch.cat([chosen, rejected])`). num_items counts pairs."""

    name = "paired loss"
    needs_reference = True

    def __init__(self, *, beta: float, reference=None, temperature: float = 1.0):
        if self.needs_reference and reference is None:
            raise ValueError(
                f"{self.name} compares the model with a reference: give reference= (a frozen copy of the starting model, "
                f"'adapter-disabled' for a PEFT model, or precomputed [2B] row log-probs)"
            )
        self.beta = _check_number(self.name, "beta", beta, strict=True)
        super().__init__(self._paired_losses, reference=reference, temperature=temperature)

    def check_batch(self, batch):
        rows = batch.targets.shape[0]
        if rows % 2:
            raise ValueError(
                f"{self.name} needs paired rows: the B chosen sequences followed by the B rejected ones (2B rows, "
                f"row b and row B+b share a prompt); got {rows} rows"
            )

    def _paired_losses(self, logps, lengths, reference):
        halves = [x.chunk(2) if x is not None else (None, None) for x in (logps, lengths, reference)]
        return self.pair_losses(*(part for pair in halves for part in pair))

    def pair_losses(self, chosen, rejected, chosen_length, rejected_length, ref_chosen, ref_rejected) -> torch.Tensor:
        """Per-pair losses `[B]` from the row sums `[B]` of the chosen and rejected halves."""
        raise NotImplementedError

    def rewards(self, logps, lengths, reference) -> torch.Tensor:
        """The implicit reward of each row `[N]` (for logs): β (log p − log p_ref) by default."""
        return self.beta * (logps - reference)

    def describe(self, logps, lengths, reference):
        chosen, rejected = self.rewards(logps, lengths, reference).chunk(2)
        chosen_logps, rejected_logps = logps.chunk(2)
        return {
            "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).double().mean().item(),
            "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item(),
        }


class DPO(PairedLoss):
    """Direct Preference Optimization, sigmoid loss (Rafailov et al. 2023):

        L = −mean_pairs log σ(β [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])

    with log π(y) the summed log-probability of a response's tokens given its prompt.
    """

    name = "DPO"

    def __init__(self, *, beta: float = 0.1, reference=None, temperature: float = 1.0):
        super().__init__(beta=beta, reference=reference, temperature=temperature)

    def pair_losses(self, chosen, rejected, chosen_length, rejected_length, ref_chosen, ref_rejected):
        return -F.logsigmoid(self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


class IPO(PairedLoss):
    """Identity Preference Optimization (Azar et al. 2023, Eq. 17), with β as the paper's τ:

        L = mean_pairs (h − 1 / (2β))²,  h = the log-ratio of chosen minus that of rejected.

    `length_normalized=True` (default, TRL's choice, which the IPO authors confirmed matches the paper's
    experiments) divides each log-ratio by its response's number of tokens; False: the summed log-ratios.
    """

    name = "IPO"

    def __init__(self, *, beta: float = 0.1, reference=None, length_normalized: bool = True, temperature: float = 1.0):
        self.length_normalized = length_normalized
        super().__init__(beta=beta, reference=reference, temperature=temperature)

    def pair_losses(self, chosen, rejected, chosen_length, rejected_length, ref_chosen, ref_rejected):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.length_normalized:
            chosen_ratio, rejected_ratio = chosen_ratio / chosen_length, rejected_ratio / rejected_length
        return (chosen_ratio - rejected_ratio - 1 / (2 * self.beta)) ** 2


class SimPO(PairedLoss):
    """Simple Preference Optimization (Meng et al. 2024): reference-free, length-normalised,

        L = −mean_pairs log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ).
    """

    name = "SimPO"
    needs_reference = False

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, temperature: float = 1.0):
        self.gamma = _check_number(self.name, "gamma", gamma)
        super().__init__(beta=beta, temperature=temperature)

    def pair_losses(self, chosen, rejected, chosen_length, rejected_length, ref_chosen, ref_rejected):
        return -F.logsigmoid(self.beta * chosen / chosen_length - self.beta * rejected / rejected_length - self.gamma)

    def rewards(self, logps, lengths, reference):
        return self.beta * logps / lengths


OBJECTIVES = {"cross-entropy": CrossEntropy, "dpo": DPO, "ipo": IPO, "simpo": SimPO}
"""Objectives `chunkwise train --objective` can build from data alone (GRPO needs rewards from generation)."""
