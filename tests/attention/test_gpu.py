"""On a CUDA device: the fused kernels, the streamed offload and the bf16 cache for real.

Skipped without a GPU (none of these has run yet: see docs/benchmarks.md, "GPU suite"). On a GPU,
`python -m pytest -m gpu` runs them in seconds; the suite measures speed and memory, these check
correctness: each CUDA kernel through the split attention against float64 math attention (within
the self-check's tolerance), the self-check picking a CUDA kernel without a warning, offloading
changing no bit with the side stream and events really in play, and the bf16 KV cache within 2x of
full backprop's bf16 error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import full_backward, max_relative_error, trainable_grads
from tiny_models import random_ids

import chunkwise.attention.chunk as attention
import chunkwise.attention.kernels as kernels
from chunkwise import SeCO
from chunkwise.attention.chunk import split_attention
from chunkwise.models.presets import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
CUDA_KERNELS = [kernels.CUDA_FLASH, kernels.CUDA_EFFICIENT, kernels.CUDA_CUDNN]


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_each_cuda_kernel_matches_math_attention(kernel, dtype, head_dim):
    if not kernel.supports(CUDA, dtype, head_dim):
        pytest.skip(f"{kernel.name} does not take {dtype}, head dim {head_dim}")
    error = kernels.self_check(kernel, CUDA, dtype, head_dim, split_attention)
    assert isinstance(error, float) and error <= kernels.CHECK_TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_the_self_check_picks_a_cuda_kernel(monkeypatch, dtype):
    monkeypatch.setattr(kernels, "_choices", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first candidate that takes the dtype should pass
        kernel = kernels.select_kernel(CUDA, dtype, 64, run=split_attention)
    assert kernel is not None and kernel.device_type == "cuda"


def test_the_self_check_leaves_the_cuda_rng_alone(monkeypatch):
    monkeypatch.setattr(kernels, "_choices", {})
    state = torch.cuda.get_rng_state(CUDA)
    kernels.select_kernel(CUDA, torch.bfloat16, 64, run=split_attention)
    assert torch.equal(torch.cuda.get_rng_state(CUDA), state)  # stage 2 replays it for dropout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_streamed_offload_changes_no_bit_on_cuda(monkeypatch, dtype):
    monkeypatch.setattr(attention, "PAST_BLOCK", 3)  # every chunk's past cut in blocks: the streams busy
    model = build_tiny_model("tiny-llama", dtype=dtype).to(CUDA)
    input_ids = random_ids(2).to(CUDA)
    grads = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        SeCO(model, chunk_size=5, offload_kv=offload).backward(input_ids)
        grads.append(trainable_grads(model))
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def test_bf16_cache_under_autocast_on_cuda():
    input_ids = random_ids(2, 192)
    _, truth = full_backward(build_tiny_model("tiny-llama", dtype=torch.float64), input_ids)
    model = build_tiny_model("tiny-llama", dtype=torch.float32).to(CUDA)
    input_ids = input_ids.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, full = full_backward(model, input_ids)
        model.zero_grad(set_to_none=True)
        SeCO(model, chunk_size=8, offload_kv=True).backward(input_ids)
    truth = {name: g.to(CUDA, torch.float32) for name, g in truth.items()}
    seco_error, full_error = max_relative_error(trainable_grads(model), truth), max_relative_error(full, truth)
    assert seco_error <= 2.0 * full_error, f"SeCO error {seco_error:.3g} vs full backprop {full_error:.3g}"
