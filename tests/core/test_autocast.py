"""Mixed precision: under the caller's torch.autocast, SeCO is as accurate as ordinary backprop.

Both stages run inside the caller's autocast context, so the stored KV and the recomputed KV are made
at the same precision. Accuracy is judged against the float64 gradient of the same weights: SeCO's
bf16 error must be about full backprop's own bf16 error. Measured over seeds 0-9 (tiny-llama, 2 x 48
tokens, chunk 8): the ratio SeCO/full ranged 0.80-1.31 (mean 0.99), both errors ~1e-2; a wrong
gradient gives errors of order 1. The bound 2.0 sits well outside that spread.
"""

import pytest
import torch
from reference import bf16_autocast_errors, float64_truth, full_backward, max_relative_error, trainable_grads
from tiny_models import random_ids

from chunkwise import SeCO
from chunkwise.models.presets import build_tiny_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_matches_full_backprop_accuracy(seed):
    input_ids = random_ids(2, 48, seed=seed)
    full_error, seco_error, out = bf16_autocast_errors(input_ids, seed=seed, chunk_size=8)
    assert seco_error < 0.05, f"SeCO bf16 gradient error {seco_error:.3g} is not bf16 rounding"
    assert seco_error <= 2.0 * full_error, f"SeCO error {seco_error:.3g} vs full backprop {full_error:.3g}"
    assert out.loss.dtype == torch.float32  # bf16 logits are upcast for the loss, as transformers does


# ----- the KV cache in the autocast dtype --------------------------------------------------------------
# Measured with the cache in bfloat16 (seeds 0-9, docs/bf16_cache_error.py): SeCO/full error ratio
# 0.76-1.24 (mean 1.01) at 2 x 48 tokens in 6 chunks, 0.58-1.12 (mean 0.89) at 2 x 192 tokens in 24
# chunks, where the KV gradient is summed in bfloat16 over up to 23 later chunks.


@pytest.fixture
def caches(monkeypatch):
    """Every ChunkCache the engine makes during the test."""
    import chunkwise.core.engine as engine

    made = []

    class Recorded(engine.ChunkCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "ChunkCache", Recorded)
    return made


def test_the_cache_keeps_kv_and_its_gradient_in_the_autocast_dtype(caches):
    model = build_tiny_model("tiny-llama", dtype=torch.float32)
    input_ids = random_ids(2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        SeCO(model, chunk_size=8).backward(input_ids)
    (cache,) = caches
    for layer in cache.layers:
        # float32 keys (RoPE's float32 tables) and bfloat16 values come in; both are kept in bfloat16
        assert layer.state_dtypes == [torch.float32, torch.bfloat16]
        assert [t.dtype for t in layer.stored + layer.gradients] == [torch.bfloat16] * 4
    assert [g.dtype for g in cache.layers[0].relay(0, 8)] == [torch.float32, torch.bfloat16]  # as the model makes them


def test_bf16_cache_error_over_many_chunks_and_offload_changes_no_bit():
    seed, input_ids = 0, random_ids(2, 192)
    truth = float64_truth("tiny-llama", input_ids, seed=seed)
    model = build_tiny_model("tiny-llama", dtype=torch.float32, seed=seed)
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, full = full_backward(model, input_ids)
        for offload in (False, True):
            model.zero_grad(set_to_none=True)
            SeCO(model, chunk_size=8, offload_kv=offload).backward(input_ids)
            grads.append(trainable_grads(model))
    full_error, seco_error = max_relative_error(full, truth), max_relative_error(grads[0], truth)
    assert seco_error <= 2.0 * full_error, f"SeCO error {seco_error:.3g} vs full backprop {full_error:.3g}"
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
