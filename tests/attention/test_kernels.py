"""`chunkwise.kernels`: the fused part kernels, their LSE layouts, and the first-use self-check.

What this file proves, on a machine without a GPU:

* The CUDA kernels' calls match the installed torch's op schemas: run on `meta` tensors (torch's meta
  kernels give each op's real output shapes), every kernel returns the LSE as `[B, H, Sq]` float32 and
  its backward accepts the merged LSE back in the op's own layout.
* The layout handling is exact: each CUDA kernel's code, with its op replaced by a stand-in that has
  the real op's schema and returns the real op's LSE layout (padded to 32 for the efficient kernel,
  with a trailing axis for cuDNN) but computes with the CPU flash kernel, gives the float64 SDPA result
  through the split attention; the stand-in backward checks that it gets its own layout back.
* Selection: a deliberately broken kernel (wrong LSE, or one that raises) is caught by the self-check,
  warned about once (naming the kernel and the error), and replaced by the next candidate; the decision
  is cached per (device, dtype, head dim); with no kernel left the blocked plain-ops attention runs; a
  kernel that does not take the dtype is skipped silently; the check leaves the global RNG alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from attention_reference import F64_TOL, assert_matches_sdpa, random_inputs, sdpa_reference

import chunkwise.attention.chunk as attention
import chunkwise.attention.kernels as kernels
from chunkwise.attention.chunk import causal_chunk_attention, split_attention
from chunkwise.attention.kernels import CPU_FLASH, CUDA_CUDNN, CUDA_EFFICIENT, CUDA_FLASH, check_errors, pad_lse, select_kernel

CUDA_KERNELS = [CUDA_FLASH, CUDA_EFFICIENT, CUDA_CUDNN]


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty decision cache for the test (and the process's cache untouched)."""
    monkeypatch.setattr(kernels, "_choices", {})


# ----- the real CUDA ops' schemas and shapes, on meta tensors -------------------------------------------


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("causal, chunk, keys", [(True, 40, 40), (False, 80, 72)])
def test_cuda_kernels_match_the_installed_schemas(kernel, causal, chunk, keys):
    meta = dict(device="meta", dtype=torch.bfloat16)
    query, grad = torch.empty(2, 4, chunk, 64, **meta), torch.empty(2, 4, chunk, 64, **meta)
    key, value = torch.empty(2, 4, keys, 64, **meta), torch.empty(2, 4, keys, 64, **meta)
    output, lse, state = kernel.forward(query, key, value, causal=causal, scale=0.125)
    assert output.shape == query.shape
    assert lse.shape == (2, 4, chunk) and lse.dtype == torch.float32
    grads = kernel.backward(grad, query, key, value, output, lse, state, causal=causal, scale=0.125)
    assert [g.shape for g in grads] == [query.shape, key.shape, value.shape]


def test_schema_calls_fill_optional_arguments_and_refuse_unknown_required_ones():
    calls = []

    class Op:
        _schema = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default._schema

        def __call__(self, **arguments):
            calls.append(arguments)
            return torch.zeros(1), torch.zeros(1)

    out = kernels.call_by_schema(Op(), {"query": 1, "key": 2, "value": 3, "scale": 0.5, "not_in_schema": 4})
    assert calls == [{"query": 1, "key": 2, "value": 3, "scale": 0.5}]  # defaults kept, strangers dropped
    assert set(out) == {0, 1, "output", "logsumexp"}
    with pytest.raises(kernels.KernelUnavailable, match="needs argument 'key'"):
        kernels.call_by_schema(Op(), {"query": 1})
    with pytest.raises(kernels.KernelUnavailable, match="no such op"):
        kernels.call_by_schema(None, {})


def test_pad_lse_puts_inf_after_the_rows():
    lse = torch.randn(1, 2, 5)
    padded = pad_lse(lse, 32)
    assert padded.shape == (1, 2, 32) and padded.is_contiguous()
    assert torch.equal(padded[..., :5], lse) and bool(torch.isinf(padded[..., 5:]).all())


# ----- the CUDA kernels' layout handling, computed on CPU -----------------------------------------------


def _cpu_flash(query, key, value, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)


def _cpu_flash_backward(grad, query, key, value, out, lse, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, out, lse, 0.0, is_causal, scale=scale
    )


class StandIn:
    """A CUDA op's schema, computed with the CPU flash kernel, returning the CUDA op's layout."""

    def __init__(self, name, compute):
        self._schema = getattr(torch.ops.aten, name).default._schema
        self.compute = compute

    def __call__(self, **arguments):
        return self.compute(**arguments)


def _rng_state():
    return torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64)


def flash_forward(query, key, value, dropout_p, is_causal, return_debug_mask, scale):
    out, lse = _cpu_flash(query, key, value, is_causal, scale)
    return (out, lse.contiguous(), None, None, query.shape[2], key.shape[2], *_rng_state(), torch.empty(0))


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, scale):
    assert logsumexp.shape == query.shape[:3] and (max_q, max_k) == (query.shape[2], key.shape[2])
    assert philox_seed.shape == (2,)  # the forward's RNG state came back
    return _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, is_causal, scale)


def efficient_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, scale):
    assert compute_log_sumexp and attn_bias is None
    out, lse = _cpu_flash(query, key, value, is_causal, scale)
    padded = torch.full((*lse.shape[:2], math.ceil(lse.shape[2] / 32) * 32), math.nan, dtype=lse.dtype)
    padded[..., : lse.shape[2]] = lse  # NaN padding: any use of it would show
    return (out, padded, *_rng_state())


def efficient_backward(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                       dropout_p, grad_input_mask, is_causal, scale):
    rows = query.shape[2]
    assert logsumexp.shape[-1] == math.ceil(rows / 32) * 32 and bool(torch.isinf(logsumexp[..., rows:]).all())
    grads = _cpu_flash_backward(grad_out_, query, key, value, out, logsumexp[..., :rows], is_causal, scale)
    return (*grads, None)


def cudnn_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, scale):
    out, lse = _cpu_flash(query, key, value, is_causal, scale)
    return (out, lse.unsqueeze(-1), None, None, query.shape[2], key.shape[2], *_rng_state(), None)


def cudnn_backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
                   cum_seq_k, max_q, max_k, dropout_p, is_causal, scale):
    assert logsumexp.shape == (*query.shape[:3], 1)
    return _cpu_flash_backward(grad_out, query, key, value, out, logsumexp.squeeze(-1), is_causal, scale)


STAND_INS = {
    "_scaled_dot_product_flash_attention": flash_forward,
    "_scaled_dot_product_flash_attention_backward": flash_backward,
    "_scaled_dot_product_efficient_attention": efficient_forward,
    "_scaled_dot_product_efficient_attention_backward": efficient_backward,
    "_scaled_dot_product_cudnn_attention": cudnn_forward,
    "_scaled_dot_product_cudnn_attention_backward": cudnn_backward,
}


@pytest.fixture
def cuda_ops_on_cpu(monkeypatch):
    original = kernels._overload
    monkeypatch.setattr(
        kernels, "_overload", lambda name: StandIn(name, STAND_INS[name]) if name in STAND_INS else original(name)
    )


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("batch, heads, kv_heads, chunk, length", [(1, 4, 4, 5, 5), (2, 8, 2, 7, 40), (1, 4, 2, 33, 100)])
def test_cuda_layouts_give_the_exact_result(cuda_ops_on_cpu, kernel, batch, heads, kv_heads, chunk, length):
    def through_split(query, key, value, scale):
        return split_attention(query, key, value, scale, replace(kernel, device_type="cpu"))

    assert_matches_sdpa(through_split, batch, heads, kv_heads, chunk, length, scale=0.3)


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=lambda k: k.name)
def test_cuda_layouts_pass_the_self_check(cuda_ops_on_cpu, fresh_choices, monkeypatch, kernel):
    monkeypatch.setattr(kernels, "KERNELS", [replace(kernel, device_type="cpu")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernel(torch.device("cpu"), torch.bfloat16, 64, run=split_attention).name == kernel.name


# ----- the first-use self-check and the selection ---------------------------------------------------------


def lse_in_base_2(query, key, value, causal, scale):
    output, lse, state = kernels._cpu_flash_forward(query, key, value, causal, scale)
    return output, lse / math.log(2), state


def raises(*args):
    raise RuntimeError("no kernel image is available for execution on the device")


BROKEN_LSE = replace(CPU_FLASH, name="broken-lse", run_forward=lse_in_base_2)
RAISING = replace(CPU_FLASH, name="raising", run_forward=raises)


def test_a_broken_kernel_is_caught_warned_once_and_replaced(fresh_choices, monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", [BROKEN_LSE, CPU_FLASH])
    query, key, value = random_inputs(2, 4, 2, 5, 23)
    with pytest.warns(RuntimeWarning) as caught:
        output = causal_chunk_attention(query, key, value, 0.3)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "attention kernel broken-lse failed its first-use check on cpu, torch.float64, head dim 8" in message
    error = kernels.kernel_choices()["cpu float64 d8"]["checks"]["broken-lse"]
    assert error > 0.1 and f"error {error:.3g} > tolerance 1e-10" in message
    torch.testing.assert_close(output, sdpa_reference(query, key, value, 0.3), rtol=0, atol=F64_TOL)
    assert kernels.kernel_choices()["cpu float64 d8"]["kernel"] == "cpu-flash"
    with warnings.catch_warnings():  # decided once: no second check, no second warning
        warnings.simplefilter("error")
        causal_chunk_attention(query, key, value, 0.3)


def test_a_kernel_that_raises_is_named_with_its_error(fresh_choices, monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", [RAISING, CPU_FLASH])
    with pytest.warns(RuntimeWarning, match=r"raising failed .* raised RuntimeError: no kernel image is available"):
        assert select_kernel(torch.device("cpu"), torch.float32, 16, run=split_attention) is CPU_FLASH


def test_the_decision_is_cached_per_device_dtype_and_head_dim(fresh_choices, monkeypatch):
    checked = []
    original = kernels.self_check
    monkeypatch.setattr(kernels, "self_check", lambda kernel, *key: checked.append(key[:3]) or original(kernel, *key))
    cpu = torch.device("cpu")
    for dtype, head_dim in [(torch.float32, 16), (torch.float32, 16), (torch.float64, 16), (torch.float32, 32)]:
        assert select_kernel(cpu, dtype, head_dim, run=split_attention) is CPU_FLASH
    assert checked == [(cpu, torch.float32, 16), (cpu, torch.float64, 16), (cpu, torch.float32, 32)]


def test_with_no_kernel_left_the_blocked_attention_runs(fresh_choices, monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", [BROKEN_LSE, RAISING])
    used, original = [], attention._BlockedAttention.apply
    monkeypatch.setattr(attention._BlockedAttention, "apply", lambda *args: used.append(1) or original(*args))
    query, key, value = random_inputs(1, 4, 2, 5, 12)
    with pytest.warns(RuntimeWarning):
        output = causal_chunk_attention(query, key, value, 0.3)
    assert used == [1]
    torch.testing.assert_close(output, sdpa_reference(query, key, value, 0.3), rtol=0, atol=F64_TOL)
    assert kernels.kernel_choices()["cpu float64 d8"]["kernel"] == "blocked"


def test_a_kernel_that_does_not_take_the_dtype_is_skipped_silently(fresh_choices, monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", [replace(BROKEN_LSE, dtypes=(torch.float16,)), CPU_FLASH])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernel(torch.device("cpu"), torch.float32, 16, run=split_attention) is CPU_FLASH
    assert list(kernels.kernel_choices()["cpu float32 d16"]["checks"]) == ["cpu-flash"]


def test_the_check_leaves_the_global_rng_alone(fresh_choices):
    state = torch.get_rng_state()
    select_kernel(torch.device("cpu"), torch.bfloat16, 16, run=split_attention)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_tolerance_separates_rounding_from_bugs(dtype):
    """cpu-flash passes with room to spare (measured in kernels.py); the broken kernel fails by far."""
    tolerance = kernels.CHECK_TOLERANCE[dtype]
    run = lambda kernel: lambda q, k, v, scale: split_attention(q, k, v, scale, kernel)  # noqa: E731
    good = max(check_errors(run(CPU_FLASH), torch.device("cpu"), dtype, 64, seed=seed) for seed in range(3))
    broken = min(check_errors(run(BROKEN_LSE), torch.device("cpu"), dtype, 64, seed=seed) for seed in range(3))
    assert good < tolerance / 3 and broken > 10 * tolerance
