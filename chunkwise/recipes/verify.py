"""Gradient check: SeCO against ordinary backprop on the user's own model.

`compare_gradients` computes one batch's gradient both ways from the same weights and input and
reports, per parameter group (parameter names with layer indices folded to `*`), the largest absolute
and relative difference. This is how a user convinces themselves chunkwise is exact on their model.

In float64 the comparison isolates chunking: transformers' Llama-family RMSNorms (Llama, Qwen2/2.5/3, Mistral)
cast their input to float32 even inside a float64 model, and the full and the chunked pass reduce in different
orders (matmul shapes differ), so their float32 roundings differ: ~1e-7 on a deep model instead of ~1e-15. For
both passes these norms compute in the model's dtype (`norms_in_model_dtype`, same formula), and the report says
so. Norms of another form (Gemma's `1 + weight`) are left as they are, and named.
"""

from __future__ import annotations

import contextlib
import re
import types
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from chunkwise.core.engine import SeCO
from chunkwise.core.loss import sequence_loss
from chunkwise.core.quantized import trainable_quantized_layers


@dataclass(frozen=True)
class GroupDifference:
    """Gradient differences within one parameter group.

    Attributes:
        group: parameter name pattern, e.g. `model.layers.*.self_attn.q_proj.weight`.
        num_tensors: parameters in the group.
        max_abs: largest |g_seco - g_full| over the group's elements.
        max_rel: largest per-tensor max|g_seco - g_full| / max|g_full| over the group.
    """

    group: str
    num_tensors: int
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class VerifyReport:
    loss_seco: float
    loss_full: float
    groups: list[GroupDifference]
    norms_in_model_dtype: int = 0
    """RMSNorm modules computed in the model's dtype instead of float32 for both passes (float64 only)."""
    norms_left_float32: tuple[str, ...] = field(default_factory=tuple)
    """Classes of float32-inside norms of an unknown form, left as they are (their rounding stays in the result)."""

    @property
    def max_rel(self) -> float:
        loss_rel = abs(self.loss_seco - self.loss_full) / max(abs(self.loss_full), 1e-300)
        return max([loss_rel] + [g.max_rel for g in self.groups])


def parameter_group(name: str) -> str:
    """Fold layer indices so all layers' copies of a parameter form one group (PEFT's prefix dropped)."""
    return re.sub(r"\.\d+\.", ".*.", name.removeprefix("base_model.model."))


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' Llama-style RMSNorm (`weight * x / sqrt(mean(x²) + eps)`) without its cast to float32."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _is_llama_style_norm(module: torch.nn.Module) -> bool:
    """A Llama-style RMSNorm: its attributes, and (on a float64 copy and probe) the same function up to float32 rounding."""
    if not (hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1):
        return False
    copy = deepcopy(module).to(torch.float64)
    probe = torch.randn(3, module.weight.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            own, patched = copy(probe), _rms_norm_in_input_dtype(copy, probe)
    except Exception:
        return False
    return own.shape == patched.shape and torch.allclose(own, patched, rtol=1e-5, atol=1e-6)


def compute_norms_in_model_dtype(model: torch.nn.Module) -> tuple[list[torch.nn.Module], tuple[str, ...]]:
    """Make every Llama-style RMSNorm of `model` compute in its input's dtype, not float32 (the same formula).

    Returns the patched modules (`restore_norms` undoes it) and the classes of RMSNorms of another form, left as
    they are. A float64 model is then float64 throughout, but for the norms left.
    """
    patched, left = [], set()
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        if _is_llama_style_norm(module):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)  # an instance attribute: the class is untouched
            patched.append(module)
        else:
            left.add(type(module).__name__)
    return patched, tuple(sorted(left))


def restore_norms(modules: list[torch.nn.Module]) -> None:
    """Undo `compute_norms_in_model_dtype`: the modules' class forward again.

    Only where the forward is still ours: transformers re-kernelizes a model whose `use_kernels` is on when its
    train/eval mode changes (the `kernels` library then sets or drops the instance's forward itself).
    """
    for module in modules:
        if getattr(module.__dict__.get("forward"), "__func__", None) is _rms_norm_in_input_dtype:
            del module.forward


@contextlib.contextmanager
def norms_in_model_dtype(model: torch.nn.Module):
    """Within: `compute_norms_in_model_dtype(model)`; yields `(number patched, classes left)`; restored on exit."""
    patched, left = compute_norms_in_model_dtype(model)
    try:
        yield len(patched), left
    finally:
        restore_norms(patched)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _full_backprop_grads(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = sequence_loss(model(input_ids=input_ids).logits, input_ids)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in _trainable(model).items()}


def compare_gradients(
    model: torch.nn.Module, *, seq_len: int, chunk_size: int, batch_size: int = 1, seed: int = 0
) -> VerifyReport:
    """Gradient of one random batch by SeCO and by full backprop, compared per parameter group.

    Runs in the model's own dtype and device; dropout is switched off (eval mode) so both passes
    compute the same function. In float64, Llama-style RMSNorms compute in float64 for both passes (see the
    module docstring; the report counts them). The model's `.grad` are left holding the SeCO gradient.
    """
    was_training = model.training
    model.eval()
    float64 = next(model.parameters()).dtype == torch.float64
    try:
        # Inside the mode change: transformers may re-kernelize a model on train()/eval(), resetting the norms' forward.
        with norms_in_model_dtype(model) if float64 else contextlib.nullcontext((0, ())) as (patched, left):
            engine = SeCO(model, chunk_size=chunk_size)
            device = engine.handle.lm.get_input_embeddings().weight.device
            generator = torch.Generator().manual_seed(seed)
            input_ids = torch.randint(0, engine.handle.vocab_size, (batch_size, seq_len), generator=generator).to(device)

            # Eval mode and an input without grad: a 4-bit base must not take bitsandbytes' inference repack in the
            # reference pass either (see chunkwise.core.quantized).
            with trainable_quantized_layers(engine.handle.lm):
                loss_full, reference = _full_backprop_grads(model, input_ids)
            model.zero_grad(set_to_none=True)
            loss_seco = engine.backward(input_ids).loss.item()
    finally:
        model.train(was_training)

    by_group: dict[str, list[tuple[float, float]]] = {}
    for name, param in _trainable(model).items():
        ref = reference[name]
        diff = (param.grad - ref).abs().max().item()
        scale = ref.abs().max().item()
        by_group.setdefault(parameter_group(name), []).append((diff, diff / scale if scale > 0 else diff))
    groups = [
        GroupDifference(group, len(rows), max(a for a, _ in rows), max(r for _, r in rows))
        for group, rows in by_group.items()
    ]
    return VerifyReport(loss_seco, loss_full, groups, norms_in_model_dtype=patched, norms_left_float32=left)
