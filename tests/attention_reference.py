"""What the chunk attention kernels are compared against: SDPA over KV repeated to every query head with the
lower-right causal mask, on random float64 inputs (test_attention, test_kernels).

Shapes: query `[B, H, C, D]` (a chunk of C tokens), key and value `[B, H_kv, S, D]` (its past and itself,
S >= C); query t sits at key position S - C + t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

F64_TOL = 1e-12  # kernel vs SDPA in float64: measured <= 4e-16 absolute on unit-scale inputs


def sdpa_reference(query, key, value, scale):
    """SDPA over KV repeated to every query head, with query t at key position S - c + t."""
    chunk, length = query.shape[2], key.shape[2]
    mask = torch.ones(chunk, length, dtype=torch.bool).tril(length - chunk)
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale
    )


def random_inputs(batch, heads, kv_heads, chunk, length, dim=8, dtype=torch.float64, seed=0):
    """Seeded N(0, 1) query `[batch, heads, chunk, dim]`, key and value `[batch, kv_heads, length, dim]`, with grad."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, chunk, dim, generator=generator, dtype=dtype, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=dtype, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=dtype, requires_grad=True)
    return query, key, value


def assert_matches_sdpa(attention, batch, heads, kv_heads, chunk, length, scale):
    """`attention(query, key, value, scale)` on `random_inputs` equals `sdpa_reference` in float64 (F64_TOL
    absolute): the output and the gradients of query, key and value for one random output gradient (drawn
    from the global generator: the caller seeds it, or not)."""
    query, key, value = random_inputs(batch, heads, kv_heads, chunk, length)
    grad_output = torch.randn(batch, heads, chunk, query.shape[-1], dtype=torch.float64)

    expected = sdpa_reference(query, key, value, scale)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_output)
    output = attention(query, key, value, scale)
    grads = torch.autograd.grad(output, (query, key, value), grad_output)

    torch.testing.assert_close(output, expected, rtol=0, atol=F64_TOL)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=F64_TOL)
