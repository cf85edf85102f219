"""Packed rows (position_ids restarting at 0): SeCO equals training each document alone (DESIGN.md §2).

What this file proves, in float64 on tiny CPU models (Llama, Qwen3, Mistral with a sliding window of 8 —
shorter than the 10- and 12-token documents — and Gemma 3 with alternating sliding/global layers), full and
LoRA, with the engine's attention and the model's own:

* SeCO on packed rows equals each document alone through one full forward, token losses summed over all
  documents and rows, one global normaliser (`packing_reference.per_document_backward`), to 1e-10 relative
  (measured <= 1e-15; Gemma 3 ~1e-7, its float32 norms): documents of mixed lengths, boundaries inside chunks
  and on chunk edges, a document spanning three chunks, one-token documents, two rows with different layouts;
  with the collator's labels (each document's first label -100) and with default labels.
* The same row read as one document (no position_ids) gives another gradient: the check is not vacuous.
* SpaCO with budget >= k is SeCO bit for bit; offloading the KV cache changes no bit.
* What is skipped is skipped: a chunk's keys start at the first key its queries may read, stage 1 does not run a
  chunk whose KV nobody reads, and stage 2 does not rebuild a chunk with no target that no later chunk read.
"""

from __future__ import annotations

import pytest
import torch
from packing_reference import collator_labels, packed_rows, per_document_backward
from reference import engine_backward, max_relative_error
from tiny_models import lora_model

from chunkwise import SeCO, SpaCO
from chunkwise.core.cache import ChunkCache
from chunkwise.models.presets import build_tiny_model

CHUNK = 5
# Two rows of 29 tokens (chunk edges at 5, 10, 15, 20, 25). Row 0: starts 7, 8 inside chunk 1, 20 and 25 on
# edges; the 12-token document (8..19) spans chunks 1-3; a one-token document at 7. Row 1: starts 10 and 20
# on edges, 21 inside, a one-token document at 20.
LAYOUTS = [[7, 1, 12, 5, 4], [10, 10, 1, 8]]
PRESETS = ["tiny-llama", "tiny-qwen3", "tiny-mistral", "tiny-gemma3"]
F64_TOL = 1e-10
GEMMA_F64_TOL = 1e-5  # Gemma 3's float32 norms: see test_seco_exactness.GEMMA_F64_TOL's derivation


def tolerance(preset: str) -> float:
    return GEMMA_F64_TOL if preset == "tiny-gemma3" else F64_TOL


def model_for(preset: str, lora: bool):
    return lora_model(preset) if lora else build_tiny_model(preset, dtype=torch.float64)


def assert_close_to(out, grads, ref_loss, ref_grads, tol):
    assert abs(out.loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    error = max_relative_error(grads, ref_grads)
    assert error <= tol, f"max relative gradient error {error:.3g}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("preset", PRESETS)
def test_seco_equals_each_document_alone(preset, lora):
    model = model_for(preset, lora)
    ids, positions = packed_rows(LAYOUTS, seed=1)
    for labels in (None, collator_labels(ids, positions)):
        ref_loss, ref_grads = per_document_backward(model, ids, positions, labels=labels)
        for attention in ("chunkwise", "model"):
            engine = SeCO(model, chunk_size=CHUNK, attention=attention)
            out, grads = engine_backward(model, engine, ids, position_ids=positions, labels=labels)
            assert_close_to(out, grads, ref_loss, ref_grads, tolerance(preset))
            assert out.num_targets == 29 * 2 - 9  # each of the 9 documents' last token predicts nothing


@pytest.mark.parametrize("layout", [[[29]], [[1] * 29], [[5, 5, 5, 5, 5, 4]], [[3, 9, 2, 15]]],
                         ids=["one-document", "one-token-documents", "on-every-edge", "one-row"])
def test_more_layouts(layout):
    model = build_tiny_model("tiny-mistral", dtype=torch.float64)
    ids, positions = packed_rows(layout, seed=2)
    ref_loss, ref_grads = per_document_backward(model, ids, positions)
    if ref_loss.item() == 0:  # one-token documents: nothing to predict, nothing moves
        out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
        assert out.num_targets == 0 and all(g.abs().max() == 0 for g in grads.values())
        return
    out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
    assert_close_to(out, grads, ref_loss, ref_grads, F64_TOL)


def test_the_documents_matter():
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, positions = packed_rows(LAYOUTS, seed=1)
    labels = collator_labels(ids, positions)
    _, ref_grads = per_document_backward(model, ids, positions, labels=labels)
    _, as_one = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, labels=labels)
    assert max_relative_error(as_one, ref_grads) > 1e-2


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_spaco_with_full_budget_and_offload_are_seco_bit_for_bit(preset):
    model = build_tiny_model(preset, dtype=torch.float64)
    for layouts in (LAYOUTS, LAYOUTS[:1]):  # an offloaded single row streams its past; two rows move it
        ids, positions = packed_rows(layouts, seed=3)
        _, seco = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
        for engine in (SpaCO(model, chunk_size=CHUNK, budget=6, sampling="uniform"),
                       SpaCO(model, chunk_size=CHUNK, budget=6, sampling="bernoulli"),
                       SeCO(model, chunk_size=CHUNK, offload_kv=True)):
            out, grads = engine_backward(model, engine, ids, position_ids=positions)
            assert all(torch.equal(grads[name], seco[name]) for name in seco), type(engine).__name__


@pytest.fixture
def cache_calls(monkeypatch):
    """Records every `ChunkCache.prepare` (num_past, record, first)."""
    calls = []
    prepare = ChunkCache.prepare

    def recorded(self, *, num_past, record, first=0):
        calls.append((num_past, record, first))
        return prepare(self, num_past=num_past, record=record, first=first)

    monkeypatch.setattr(ChunkCache, "prepare", recorded)
    return calls


def test_foreign_chunks_are_neither_read_nor_rebuilt(cache_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    # Documents of 10 and 19 tokens; the first has no target. Chunks 0-1 hold the first document only: chunks 2-5
    # read keys from 10 on; nobody reads chunk 1's KV nor relays into chunks 0-1.
    ids, positions = packed_rows([[10, 19]], seed=4)
    labels = ids.clone()
    labels[:, :10] = -100
    ref_loss, ref_grads = per_document_backward(model, ids, positions, labels=labels)
    out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions, labels=labels)
    assert_close_to(out, grads, ref_loss, ref_grads, F64_TOL)
    stage_1 = [(past, first) for past, record, first in cache_calls if record]
    stage_2 = [(past, first) for past, record, first in cache_calls if not record]
    assert stage_1 == [(0, 0), (2, 10), (3, 10), (4, 10)]  # chunk 1: no reader; chunk 5: the last
    assert stage_2 == [(5, 10), (4, 10), (3, 10), (2, 10)]  # chunks 0 and 1: no target, no relay


def test_keys_start_at_the_first_readable_key(monkeypatch):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, positions = packed_rows([[7, 1, 12, 5, 4]], seed=1)
    from chunkwise.core import cache as cache_module

    lengths = []
    update = cache_module.ChunkLayer.update

    def recorded(self, key_states, value_states, *args, **kwargs):
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        lengths.append((self.past_length + key_states.shape[-2], keys.shape[-2]))
        return keys, values

    monkeypatch.setattr(cache_module.ChunkLayer, "update", recorded)
    engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
    first = {5: 0, 10: 0, 15: 8, 20: 8, 25: 20, 29: 25}  # chunk end -> first key its queries may read
    assert lengths and all(keys == end - first[end] for end, keys in lengths)
