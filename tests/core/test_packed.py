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
    if max(layout[0]) == 1:  # one-token documents only: nothing to predict, nothing moves
        out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
        assert out.num_targets == 0 and out.loss.item() == 0 and all(g.abs().max() == 0 for g in grads.values())
        return
    ref_loss, ref_grads = per_document_backward(model, ids, positions)
    out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=positions)
    assert_close_to(out, grads, ref_loss, ref_grads, F64_TOL)


def test_the_documents_matter():
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, positions = packed_rows(LAYOUTS, seed=1)
    labels = collator_labels(ids, positions)
    _, ref_grads = per_document_backward(model, ids, positions, labels=labels)
    _, as_one = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, labels=labels)
    assert max_relative_error(as_one, ref_grads) > 1e-2


@pytest.mark.parametrize("preset", PRESETS)
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


def tiny_qwen2_vl():
    """A tiny float64 Qwen2-VL (M-RoPE sections 2/3/3 of the 8 rotary frequencies), fed text-only rows."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    return model.to(torch.float64)


@pytest.mark.parametrize("rows", [3, 4], ids=["3-d", "4-d-text-first"])
def test_mrope_positions_are_passed_through(rows):
    """M-RoPE `[3, B, T]` ids (and transformers' packed `[4, B, T]`, text positions first) reach the model as given:
    height and width rows that are not the temporal one plus a constant (rotary embeddings see only differences), so
    a dropped or replaced row would change the gradient."""
    model = tiny_qwen2_vl()
    ids, positions = packed_rows(LAYOUTS, seed=5)
    mrope = torch.stack([positions, positions // 2, 2 * positions])  # [3, B, T]
    given = mrope if rows == 3 else torch.cat([positions[None], mrope])
    ref_loss, ref_grads = per_document_backward(model, ids, positions, model_position_ids=mrope)
    out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, position_ids=given)
    assert_close_to(out, grads, ref_loss, ref_grads, F64_TOL)
    _, plain = per_document_backward(model, ids, positions)
    assert max_relative_error(plain, ref_grads) > 1e-3


def test_eager_attention_gets_an_additive_mask():
    """A model using eager attention reads the engine's per-document mask as an additive one (0 / float32 minimum)."""
    model = build_tiny_model("tiny-mistral", dtype=torch.float64)
    model.set_attn_implementation("eager")
    ids, positions = packed_rows(LAYOUTS, seed=6)
    ref_loss, ref_grads = per_document_backward(model, ids, positions)
    out, grads = engine_backward(model, SeCO(model, chunk_size=CHUNK, attention="model"), ids, position_ids=positions)
    assert_close_to(out, grads, ref_loss, ref_grads, F64_TOL)
