"""`chunkwise.offload`: the offloaded past streamed block by block, the same code path as on a GPU.

On CPU the side stream and its events are absent and copies are synchronous, so what is checked here
is the data flow: which blocks are fetched into which of the two device buffers, that the next layer's
first block is fetched ahead and used, that gradients are added to what later chunks sent and written
back, and that every bit of the result is the one without offloading (SeCO, SpaCO, 3-key blocks that
cut every chunk's past, a padded batch where some layers fall back to SDPA). The overlap itself, pinned
memory and the device memory saved need a GPU: the GPU suite measures them (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch
from reference import trainable_grads
from tiny_models import random_ids

import chunkwise.attention.chunk as attention
from chunkwise import SeCO, SpaCO
from chunkwise.attention.offload import BlockStreamer, time_major
from chunkwise.models.presets import build_tiny_model


def test_blocks_alternate_between_two_buffers_and_hold_the_host_data():
    host = [time_major(1, 2, 10, 4) for _ in range(2)]
    for t in host:
        t.copy_(torch.randn(t.shape))
    streamer = BlockStreamer(torch.device("cpu"))
    bounds = [(0, 3), (3, 6), (6, 9), (9, 10)]
    seen = []
    for (start, end), (keys, values) in zip(bounds, streamer.blocks(host, bounds)):
        assert torch.equal(keys, host[0][:, :, start:end]) and torch.equal(values, host[1][:, :, start:end])
        assert keys.stride() == host[0][:, :, start:end].stride()  # the host's time-major layout: one copy
        seen.append(keys.data_ptr())
    assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]
    assert len(streamer._buffers) == 2 and all(len(b) == 2 for b in streamer._buffers.values())


def test_the_next_layers_first_block_is_fetched_ahead_and_used(monkeypatch):
    layer_a, layer_b = [time_major(1, 2, 6, 4) for _ in range(2)], [time_major(1, 2, 6, 4) for _ in range(2)]
    for t in layer_a + layer_b:
        t.copy_(torch.randn(t.shape))
    streamer = BlockStreamer(torch.device("cpu"))
    fetches = []
    original = streamer.fetch
    monkeypatch.setattr(streamer, "fetch", lambda sources: fetches.append(sources[0].data_ptr()) or original(sources))
    list(streamer.blocks(layer_a, [(0, 3), (3, 6)], then=(layer_b, (0, 3))))
    assert len(fetches) == 3  # layer a's two blocks, then layer b's first
    blocks = list(streamer.blocks(layer_b, [(0, 3), (3, 6)]))
    assert len(fetches) == 4  # layer b's first block came from the warm-up
    assert torch.equal(blocks[0][0], layer_b[0][:, :, 0:3]) and torch.equal(blocks[1][1], layer_b[1][:, :, 3:6])


def test_a_warm_block_nobody_asks_for_is_dropped():
    layer_a, layer_b = [time_major(1, 2, 6, 4) for _ in range(2)], [time_major(1, 2, 6, 4) for _ in range(2)]
    streamer = BlockStreamer(torch.device("cpu"))
    streamer.warm_up(layer_b, (0, 3))
    keys, _ = next(iter(streamer.blocks(layer_a, [(0, 3)])))  # another layer: fetched afresh
    assert torch.equal(keys, layer_a[0][:, :, 0:3]) and streamer._warm is None


@pytest.fixture
def streamed(monkeypatch):
    """3-key past blocks (every chunk's past is cut), and a count of streamed attention calls."""
    monkeypatch.setattr(attention, "PAST_BLOCK", 3)
    calls = []
    original = attention._OffloadedSplitAttention.apply
    monkeypatch.setattr(attention._OffloadedSplitAttention, "apply", lambda *args: calls.append(1) or original(*args))
    return calls


def grads_with_and_without_offload(make_engine, model, input_ids, **batch):
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        out = make_engine(offload).backward(input_ids, **batch)
        results.append((out.loss, trainable_grads(model)))
    return results


@pytest.mark.parametrize("engine", ["seco", "spaco"])
def test_streamed_offload_changes_no_bit(streamed, engine):
    model = build_tiny_model("tiny-qwen3", dtype=torch.float64)
    if engine == "seco":
        make = lambda offload: SeCO(model, chunk_size=4, offload_kv=offload)  # noqa: E731
    else:
        make = lambda offload: SpaCO(model, chunk_size=4, budget=3, seed=1, offload_kv=offload)  # noqa: E731
    (loss, grads), (offload_loss, offload_grads) = grads_with_and_without_offload(make, model, random_ids(2))
    assert streamed  # the streamed path ran
    assert torch.equal(loss, offload_loss)
    assert all(torch.equal(offload_grads[name], grads[name]) for name in grads)


def test_streamed_and_fallback_layers_mix_in_one_step(streamed):
    """Padding sends the chunks that see it to SDPA (which moves the offloaded past whole), the others
    stream; both add into the same host gradient buffers."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 12:] = 0
    labels = random_ids(2).masked_fill(mask == 0, -100)
    make = lambda offload: SeCO(model, chunk_size=5, offload_kv=offload)  # noqa: E731
    results = grads_with_and_without_offload(make, model, random_ids(2), labels=labels, attention_mask=mask)
    (loss, grads), (offload_loss, offload_grads) = results
    assert streamed
    assert torch.equal(loss, offload_loss)
    assert all(torch.equal(offload_grads[name], grads[name]) for name in grads)
