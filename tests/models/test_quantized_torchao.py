"""torchao weight-only quantized bases with LoRA, trained chunk-wise: the same exactness check as bitsandbytes'.

What runs on CPU with torch 2.13 and torchao 0.18: `Int8WeightOnlyConfig` (int8 weights) and
`IntxWeightOnlyConfig(weight_dtype=torch.int4)` (int4 values, stored one per int8). `Int4WeightOnlyConfig`
(packed int4) does not: its "plain" format needs the `mslk` kernels (CUDA), "plain_int32" says "does not
support device 'cpu' yet", "tile_packed_to_4d" needs CUDA.

Tolerance as in test_quantized.py: float32 rounding of the chunked sums (~1e-7 per term, measured max 7e-7).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402

from chunkwise import SeCO, SpaCO  # noqa: E402
from chunkwise.core.handle import inspect_causal_lm  # noqa: E402
from chunkwise.core.inference import chunked_loss_sum  # noqa: E402
from chunkwise.models.loading import add_lora  # noqa: E402
from chunkwise.models.presets import build_tiny_model  # noqa: E402
from reference import full_backward, max_relative_error, trainable_grads  # noqa: E402

TOLERANCE = 1e-5
CONFIGS = {"int8": lambda: Int8WeightOnlyConfig(), "int4-in-int8": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4)}


def torchao_lora(preset: str, config: str) -> torch.nn.Module:
    """A tiny preset whose decoder linears are quantized weight-only by torchao, with LoRA on q and v."""
    model = build_tiny_model(preset, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, CONFIGS[config](), filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lm_head" not in name)
    return add_lora(model, rank=4, random_b=0.1, seed=1).train()


def padded_batch(length: int = 48, pad: int = 11):
    input_ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(input_ids)
    mask[1, length - pad:] = 0
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_seco_and_spaco_match_full_backprop_through_a_torchao_quantized_model(preset, config):
    model = torchao_lora(preset, config)
    assert "Tensor" in type(inspect_causal_lm(model).decoder.layers[0].mlp.up_proj.weight).__name__  # quantized, not nn.Parameter
    input_ids, mask, labels = padded_batch()
    _, reference = full_backward(model, input_ids, labels=labels, attention_mask=mask)
    for chunk_size in (64, 16):  # one chunk, three chunks
        engines = [SeCO(model, chunk_size=chunk_size), SpaCO(model, chunk_size=chunk_size, budget=-(-48 // chunk_size), seed=2)]
        for engine in engines:
            model.zero_grad(set_to_none=True)
            engine.backward(input_ids, labels=labels, attention_mask=mask)
            assert max_relative_error(trainable_grads(model), reference) <= TOLERANCE, (type(engine).__name__, chunk_size)


def test_eval_mode_no_grad_pass_then_training_on_a_torchao_base():
    model = torchao_lora("tiny-llama", "int8")
    input_ids, mask, labels = padded_batch()
    _, reference = full_backward(model, input_ids, labels=labels, attention_mask=mask)
    model.eval()
    chunked_loss_sum(inspect_causal_lm(model), {"input_ids": input_ids, "labels": labels, "attention_mask": mask}, chunk_size=16)
    model.zero_grad(set_to_none=True)
    SeCO(model, chunk_size=16).backward(input_ids, labels=labels, attention_mask=mask)  # eval mode, as from_pretrained leaves it
    assert max_relative_error(trainable_grads(model), reference) <= TOLERANCE
    model.train()
    model.zero_grad(set_to_none=True)
    SeCO(model, chunk_size=16).backward(input_ids, labels=labels, attention_mask=mask)
    assert max_relative_error(trainable_grads(model), reference) <= TOLERANCE
