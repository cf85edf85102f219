"""Token-local objectives: L = Σ_{b,t} c_{b,t} · ℓ(log p_{b,t}, extras_{b,t}); GRPO is one.

Chunk j backpropagates its own tokens' terms; their sum over the chunks is L. Stage 1 collects nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chunkwise.core.batch import ChunkedBatch
from chunkwise.core.loss import IGNORE_INDEX, target_logps
from chunkwise.core.objectives.base import (BoundObjective, Objective, check_number, check_rows_have_targets, per_token_tensor,
                                            reference_logps_for)
from chunkwise.core.reference import reference_token_logps


NORMALIZATIONS = ("token", "sequence", "fixed")


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
        self.temperature = check_number(self.name, "temperature", temperature, strict=True)
        self.allow_empty_rows = allow_empty_rows
        self.values = values

    def bind(self, batch, *, num_items, policy) -> BoundObjective:
        valid = batch.targets != IGNORE_INDEX
        counts = valid.sum(dim=1)
        if not self.allow_empty_rows:
            check_rows_have_targets(self.name, batch, counts)
        values = {name: per_token_tensor(self.name, name, value, batch, valid) for name, value in self.values.items() if value is not None}
        reference = reference_logps_for(self.name, self.reference, batch, policy, per_token=True)
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
        beta = check_number(self.name, "beta", beta)
        if beta > 0 and reference is None:
            raise ValueError(f"{self.name}: beta={beta:g} weighs a KL term to a reference; give reference= (log-probs, a model or 'adapter-disabled') or set beta=0")
        if beta == 0 and reference is not None:
            raise ValueError(f"{self.name}: a reference is only used by the KL term; set beta > 0, or drop reference")
        epsilon_low = check_number(self.name, "epsilon", epsilon)
        epsilon_high = epsilon_low if epsilon_high is None else check_number(self.name, "epsilon_high", epsilon_high)
        if delta is not None:
            delta = check_number(self.name, "delta", delta, low=1.0)
        settings = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, kl_ratio_weighted=kl_ratio_weighted)
        super().__init__(
            lambda logps, **values: grpo_token_loss(logps, **values, **settings),
            normalization=normalization, max_length=max_length, reference=reference, temperature=temperature,
            allow_empty_rows=allow_empty_rows, advantages=advantages, old_logps=old_logps,
        )

