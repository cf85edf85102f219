"""Per-document attention of a packed row's chunk (`chunkwise.attention.documents`), without a mask.

What this file proves:

* On the engine's mask for a chunk of a packed batch (two rows, different layouts, keys narrowed to the first one
  any query may read), `chunk_attention_forward` equals SDPA with that mask over repeated KV heads — output and
  query/key/value gradients, float64 to rounding — through the CPU split kernel and through the blocked kernel,
  making one kernel call per document run and no SDPA call.
* Through the engine, every layer of every chunk of a packed Llama row runs the kernel (none falls back), and
  the blocked kernel with an offloaded cache still equals each document trained alone.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from kernel_fixtures import kernel_calls  # noqa: F401  (a fixture)
from packing_reference import packed_rows, per_document_backward
from reference import engine_backward, max_relative_error
from transformers.integrations.sdpa_attention import repeat_kv

import chunkwise.attention.chunk as attention
import chunkwise.attention.kernels as kernels
from chunkwise import SeCO
from chunkwise.core.documents import find_documents
from chunkwise.models.presets import build_tiny_model

LAYOUTS = [[7, 1, 12, 5, 4], [10, 10, 1, 8]]


@pytest.fixture
def blocked_kernel(monkeypatch):
    """No fused kernel: `_BlockedAttention` with 3-key blocks, as on devices without one."""
    monkeypatch.setattr(kernels, "KERNELS", [])
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(attention, "_MIN_BLOCK", 3)


def masked_sdpa(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("kernel", ["split", "blocked"])
@pytest.mark.parametrize("start, end", [(0, 5), (10, 15), (20, 25), (25, 29)])
def test_equals_sdpa_with_the_document_mask(request, kernel_calls, kernel, start, end):
    if kernel == "blocked":
        request.getfixturevalue("blocked_kernel")
    _, positions = packed_rows(LAYOUTS)
    documents = find_documents(positions, shape=positions.shape, attention_mask=None, max_positions=None)
    first = documents.first_key(start, end)
    mask = documents.chunk_mask(start, end, first, window=None, implementation="sdpa")
    generator = torch.Generator().manual_seed(start)
    query = torch.randn(2, 4, end - start, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(2, 2, end - first, 16, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    output, _ = attention.chunk_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert kernel_calls["sdpa"] == 0 and kernel_calls["kernel"] >= 2  # one call per document run, per row
    expected = masked_sdpa(query, key, value, mask, 0.25).transpose(1, 2)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(output, (query, key, value), grad_output)
    want = torch.autograd.grad(expected, (query, key, value), grad_output)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_every_layer_of_a_packed_step_runs_the_kernel(kernel_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, positions = packed_rows(LAYOUTS, seed=1)
    engine_backward(model, SeCO(model, chunk_size=5), ids, position_ids=positions)
    assert kernel_calls["sdpa"] == 0 and kernel_calls["kernel"] > 0


def test_blocked_kernel_with_offload_equals_each_document_alone(blocked_kernel):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, positions = packed_rows(LAYOUTS[:1], seed=1)  # one row: the offloaded past streams
    ref_loss, ref_grads = per_document_backward(model, ids, positions)
    out, grads = engine_backward(model, SeCO(model, chunk_size=5, offload_kv=True), ids, position_ids=positions)
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-10 * ref_loss.item()
    assert max_relative_error(grads, ref_grads) <= 1e-10
