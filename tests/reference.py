"""Reference gradients the engines are compared against, one engine step from zero gradients, and the error
measures used by the tests.

The references compute the loss themselves (`chunk_loss_sum` over the model's logits) rather than
through transformers' built-in loss, because that one upcasts logits to float32 even for a float64
model, which would hide float64 agreement behind float32 rounding. `test_loss_convention` checks that
the conventions (shift, -100, normalisation) match transformers' loss.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the `.grad` of every trainable parameter (zeros where a gradient was never set)."""
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def full_backward(model, input_ids, *, labels=None, attention_mask=None, num_items=None):
    """Ordinary backprop through one full-sequence forward. Returns (loss, grads); zeroes grads first."""
    model.zero_grad(set_to_none=True)
    labels = input_ids if labels is None else labels
    targets = shift_labels(labels)
    normaliser = num_items if num_items is not None else (targets != IGNORE_INDEX).sum()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = chunk_loss_sum(logits, targets) / normaliser
    loss.backward()
    return loss.detach(), trainable_grads(model)


def chunk_by_chunk_backward(model, input_ids, *, chunk_size, labels=None, local_chunk=None, scale=1.0):
    """Backprop through a differentiable chunk-by-chunk forward with a plain `DynamicCache`.

    This is the reference when dropout is active: a chunked pass cannot reproduce the full pass's
    dropout masks, but it defines the masks SeCO must reproduce (same seed, same chunk order).
    The caller seeds the RNG. Returns (loss, grads); zeroes grads first.

    local_chunk: if given (an index j), only chunk j's loss is backpropagated, with its past held fixed
        (chunks before j run without gradient, chunks after it do not run): what SpaCO estimates when j
        alone is selected.
    scale: the loss is multiplied by it before backward (SpaCO's compensation factor).
    `input_ids` `[B, T]`; the loss is normalised by the batch's target count.
    """
    model.zero_grad(set_to_none=True)
    labels = input_ids if labels is None else labels
    targets = shift_labels(labels)
    normaliser = (targets != IGNORE_INDEX).sum()
    cache = DynamicCache()
    total = 0.0
    seq_len = input_ids.shape[1]
    for index, start in enumerate(range(0, seq_len, chunk_size)):
        if local_chunk is not None and index > local_chunk:
            break
        end = min(start + chunk_size, seq_len)
        with torch.set_grad_enabled(local_chunk is None or index == local_chunk):
            logits = model(
                input_ids=input_ids[:, start:end],
                position_ids=torch.arange(start, end).unsqueeze(0),
                cache=cache,
                use_cache=True,
            ).logits
        if local_chunk is None or index == local_chunk:
            total = total + chunk_loss_sum(logits, targets[:, start:end]) / normaliser
    total = total * scale  # x * 1.0 == x in floating point: the default adds no rounding
    total.backward()
    return total.detach(), trainable_grads(model)


def float64_truth(preset: str, input_ids: torch.Tensor, *, seed: int) -> dict[str, torch.Tensor]:
    """The float64 full-backprop gradient of the tiny `preset` built with `seed`, as float32: the truth that
    lower-precision gradients of the same weights are judged against."""
    from chunkwise.models.presets import build_tiny_model

    _, truth = full_backward(build_tiny_model(preset, dtype=torch.float64, seed=seed), input_ids)
    return {name: g.float() for name, g in truth.items()}


def bf16_autocast_errors(input_ids: torch.Tensor, *, seed: int, chunk_size: int, preset: str = "tiny-llama"):
    """Under bfloat16 autocast with float32 weights: (full backprop's, SeCO's) max relative gradient error
    against `float64_truth`, and SeCO's `BackwardOutput`. `input_ids` `[B, T]`."""
    from chunkwise import SeCO
    from chunkwise.models.presets import build_tiny_model

    truth = float64_truth(preset, input_ids, seed=seed)
    model = build_tiny_model(preset, dtype=torch.float32, seed=seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, full = full_backward(model, input_ids)
        model.zero_grad(set_to_none=True)
        out = SeCO(model, chunk_size=chunk_size).backward(input_ids)
    return max_relative_error(full, truth), max_relative_error(trainable_grads(model), truth), out


def engine_backward(model, engine, input_ids, **kwargs):
    """One `engine.backward(input_ids, **kwargs)` from zero gradients: (its output, copies of every trainable gradient)."""
    model.zero_grad(set_to_none=True)
    out = engine.backward(input_ids, **kwargs)
    return out, trainable_grads(model)


def max_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor error, max|g - ref| / max|ref| (a tensor whose reference is all zero must be zero)."""
    worst = 0.0
    for name, ref in reference.items():
        diff = (grads[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# ----- float32 error bounds: tolerances for comparisons with float32 arithmetic that is not ours ------------------

U32 = 2.0**-24  # float32 unit roundoff: a correctly rounded float32 operation is off by at most u |exact result|


def float32_log_softmax_error(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """A first-order bound on |float32 log-softmax(logits / T)[target] - exact| per position, for exact (float64)
    `logits` `[..., V]` that a library rounds to float32 before its log-softmax (transformers' loss, TRL's fused head).

    With z = logits / T, m = max_v z_v, S = sum_v exp(z_v - m), log Z = m + log S:
        3u|z_y|                 the target logit: rounded to float32, times 1/T (itself rounded), the product rounded
      + 3u max_v |z_v|          the same for every logit; log-sum-exp is 1-Lipschitz in the max norm of its input
      + u max_v |z_v - m| + 2u  z_v - m rounded, then exp, accurate to 1 ulp = 2u (vectorised and libm expf)
      + (V - 1)u                the float32 sum S of V positive terms, in any order (any CPU's vector width)
      + 2u + 2u|log S|          log S to 1 ulp
      + u|log Z| + u|log p_y|   m + log S, then z_y - log Z
    Each error is relative to the exact intermediate, so the bound is in units of the sizes computed, not of the
    result. Second-order terms (u^2 x sizes) are left to the callers' factor 2.
    """
    z = logits.double() / temperature
    m, log_z = z.amax(-1), torch.logsumexp(z, -1)
    target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return U32 * (3 * target.abs() + 3 * z.abs().amax(-1) + (z - m.unsqueeze(-1)).abs().amax(-1) + 2 + (z.shape[-1] - 1)
                  + 2 + 2 * (log_z - m).abs() + log_z.abs() + (target - log_z).abs())


def loss_and_gradients(model, loss_fn):
    """Zero the gradients, backpropagate `loss_fn()` (a scalar built from `model`), return (detached loss, grads)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), trainable_grads(model)


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every gradient flattened and concatenated, in the dict's order: one vector `[total numel]`."""
    return torch.cat([g.flatten() for g in grads.values()])


def relative_l2(estimate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||estimate - reference|| / ||reference|| over all gradients together (one L2 norm of the flat vectors)."""
    return ((flat(estimate) - flat(reference)).norm() / flat(reference).norm()).item()
