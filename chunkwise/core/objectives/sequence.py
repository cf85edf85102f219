"""Sequence-level objectives: L = f(s_1, …, s_N) over each row's summed target log-probability; DPO, IPO, SimPO.

Stage 1 runs the LM head on every chunk and adds up each s_b; chunk j then backpropagates
Σ_b w_b Σ_{t in chunk j} log p_{b,t} with w_b = ∂L/∂s_b, which sums to ∇L exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from chunkwise.core.batch import ChunkedBatch
from chunkwise.core.loss import IGNORE_INDEX, target_logps
from chunkwise.core.objectives.base import BoundObjective, Objective, check_number, check_rows_have_targets, reference_logps_for
from chunkwise.core.reference import reference_token_logps


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
        self.temperature = check_number(self.name, "temperature", temperature, strict=True)

    def check_batch(self, batch: ChunkedBatch) -> None:
        """Batch-layout checks of a subclass (e.g. chosen/rejected pairing); raise ValueError."""

    def describe(self, logps: torch.Tensor, lengths: torch.Tensor, reference_logps: torch.Tensor | None) -> dict[str, float]:
        """Statistics for logs from the exact row sums (no autograd); none by default."""
        return {}

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        self.check_batch(batch)
        counts = (batch.targets != IGNORE_INDEX).sum(dim=1)
        check_rows_have_targets(self.name, batch, counts)
        reference = reference_logps_for(self.name, self.reference, batch, policy, per_token=False)
        if reference is not None and not isinstance(reference, torch.Tensor):
            tokens = reference_token_logps(reference, batch, chunk_size=policy.chunk_size, temperature=self.temperature)
            reference = tokens.sum(dim=1)
        return _BoundSequenceLoss(self, batch, counts.double(), reference, num_items)


class _BoundSequenceLoss(BoundObjective):
    needs_stage_1_logits = True
    loss_is_chunk_sum = False

    @property
    def zero_gradient_is_error(self) -> bool:
        return getattr(self.objective, "zero_gradient_is_error", False)

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
    # The margin's gradient vanishes only at exact saturation (or a pair whose two rows are identical).
    zero_gradient_is_error = True

    def __init__(self, *, beta: float, reference=None, temperature: float = 1.0):
        if self.needs_reference and reference is None:
            raise ValueError(
                f"{self.name} compares the model with a reference: give reference= (a frozen copy of the starting model, "
                f"'adapter-disabled' for a PEFT model, or precomputed [2B] row log-probs)"
            )
        self.beta = check_number(self.name, "beta", beta, strict=True)
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
        self.gamma = check_number(self.name, "gamma", gamma)
        super().__init__(beta=beta, temperature=temperature)

    def pair_losses(self, chosen, rejected, chosen_length, rejected_length, ref_chosen, ref_rejected):
        return -F.logsigmoid(self.beta * chosen / chosen_length - self.beta * rejected / rejected_length - self.gamma)

    def rewards(self, logps, lengths, reference):
        return self.beta * logps / lengths

