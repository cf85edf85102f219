"""Quantized base weights (bitsandbytes) kept trainable through chunkwise's passes without autograd.

bitsandbytes' CPU path for 4-bit layers (`Linear4bit.forward`, bitsandbytes 0.50 on a CPU with AVX512-BF16)
repacks the layer's weight into an inference-only layout the first time the layer runs in eval mode on an
input that does not require grad (`_convert_weight_packed_for_cpu`). The repack is permanent, and every later
backward through that layer computes the input's gradient from the repacked bytes as if they were the
training layout: every gradient upstream of it (LoRA adapters included) comes out exactly zero, with no error.

Chunkwise runs many such forwards: stage 1 of every step (under `torch.no_grad()`), stage 2's first layers
(whose inputs do not require grad under LoRA), held-out evaluation, probes, reference log-probs. So:

* `trainable_quantized_layers(model)` is the context every such pass runs in: each bitsandbytes 4-bit layer
  reports `training=True` for its duration (the flag gates nothing else in `Linear4bit.forward`; the peft
  wrapper around it, whose dropout does depend on the mode, keeps its own flag), and a weight repacked
  earlier — by the user's own eval forward, or Trainer's — is unpacked first (bitsandbytes' own inverse,
  the one it runs before saving a state dict or moving the layer to a GPU).

Without bitsandbytes imported there is no such layer and the context costs one dictionary look-up.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

import torch


def _linear_4bit_class():
    """`bitsandbytes.nn.Linear4bit` when bitsandbytes is imported (no 4-bit layer can exist otherwise), else None."""
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, "Linear4bit", None) if module is not None else None


def quantized_4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit linear layers inside `model` (empty without bitsandbytes)."""
    linear_4bit = _linear_4bit_class()
    if linear_4bit is None:
        return []
    return [module for module in model.modules() if isinstance(module, linear_4bit)]


def is_quantized(lm: torch.nn.Module) -> bool:
    """Whether the Hugging Face model `lm` was loaded with a quantization config (bitsandbytes, torchao, ...)."""
    return getattr(lm, "hf_quantizer", None) is not None or bool(getattr(lm, "is_quantized", False))


KBIT_CHECKPOINTING_FIX = "prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)"
"""The call that prepares a quantized base for LoRA without turning gradient checkpointing on."""


def unpack_inference_layout(layer: torch.nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repack of one 4-bit layer's weight; True if it was repacked.

    The repack is lossy: it rounds the per-block scales (`absmax`) to bfloat16. bitsandbytes' inverse
    (0.50) restores the packed bytes exactly but leaves unnested scales in the repack's transposed
    `[K / blocksize, N]` bfloat16 layout, which dequantizes every block with another block's scale; they
    are put back in the training layout `[N * K / blocksize]` here (in float32, still rounded).
    """
    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layer.weight.data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    layer.weight.quant_state = state
    return True


@contextmanager
def trainable_quantized_layers(model: torch.nn.Module):
    """Run a pass (with or without autograd) that must leave `model`'s quantized layers trainable.

    Every bitsandbytes 4-bit layer's weight is in its training layout on entry (unpacked if something
    repacked it) and stays so: the layers' `training` flag is True inside, restored on exit.
    """
    layers = quantized_4bit_layers(model)
    modes = [layer.training for layer in layers]
    repacked = [layer for layer in layers if unpack_inference_layout(layer)]
    if repacked:
        warnings.warn(
            f"{len(repacked)} 4-bit layers had been repacked by bitsandbytes for CPU inference (a forward in eval mode "
            "without grad, outside chunkwise), which rounds their block scales to bfloat16; chunkwise restored the "
            "training layout (gradients are exact for the model as it now is). Reload the model for its exact "
            "weights, or keep it in train mode for such forwards.", stacklevel=3)
    for layer in layers:
        layer.training = True  # the layer's own flag only: it gates bitsandbytes' inference repack, nothing else
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
