"""Gradient check: SeCO against ordinary backprop on the user's own model.

`compare_gradients` computes one batch's gradient both ways from the same weights and input and
reports, per parameter group (parameter names with layer indices folded to `*`), the largest absolute
and relative difference. This is how a user convinces themselves chunkwise is exact on their model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

    @property
    def max_rel(self) -> float:
        loss_rel = abs(self.loss_seco - self.loss_full) / max(abs(self.loss_full), 1e-300)
        return max([loss_rel] + [g.max_rel for g in self.groups])


def parameter_group(name: str) -> str:
    """Fold layer indices so all layers' copies of a parameter form one group (PEFT's prefix dropped)."""
    return re.sub(r"\.\d+\.", ".*.", name.removeprefix("base_model.model."))


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
    compute the same function. The model's `.grad` are left holding the SeCO gradient.
    """
    was_training = model.training
    model.eval()
    try:
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
    return VerifyReport(loss_seco, loss_full, groups)
