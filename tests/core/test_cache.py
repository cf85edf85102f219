"""ChunkCache: KV written into per-layer buffers, views of "the first j chunks", the gradient relay, freeing."""

import pytest
import torch

from chunkwise.core.cache import ChunkCache

B, H, D = 2, 3, 4
LAYERS = 2


def kv(length: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(B, H, length, D, requires_grad=requires_grad), torch.randn(B, H, length, D, requires_grad=requires_grad))


def record_chunks(cache: ChunkCache, lengths: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Stage 1 by hand: for each chunk, every layer updates under no_grad; returns what was written."""
    written = []
    for chunk, length in enumerate(lengths):
        cache.prepare(num_past=chunk, record=True)
        per_layer = []
        with torch.no_grad():
            for layer in range(LAYERS):
                k, v = kv(length)
                cache.update(k, v, layer)
                per_layer.append((k, v))
        cache.commit(length)
        written.append(per_layer)
    return written


def test_stage1_stores_each_chunk_in_its_slot_without_a_graph():
    cache = ChunkCache(total_length=8)
    written = record_chunks(cache, [3, 3, 2])
    assert cache.num_chunks == 3 and len(cache.layers) == LAYERS
    for chunk, per_layer in enumerate(written):
        slots = cache.stored(chunk)
        assert len(slots) == 2 * LAYERS
        expected = [t for pair in per_layer for t in pair]
        for slot, original in zip(slots, expected):
            assert slot.grad_fn is None and not slot.requires_grad
            assert slot.shape == original.shape == (B, H, original.shape[2], D)
            assert torch.equal(slot, original)
    # One buffer per layer and K/V, shared by every chunk: nothing is concatenated or copied again.
    assert all(s.untyped_storage().data_ptr() == cache.stored(0)[i].untyped_storage().data_ptr() for i, s in enumerate(cache.stored(2)))
    assert all(g is None for g in cache.relay(0))  # no gradient before stage 2


def test_stage1_forward_sees_the_growing_past():
    cache = ChunkCache(total_length=8)
    record_chunks(cache, [3, 3])
    cache.prepare(num_past=2, record=True)
    assert cache.get_seq_length() == 6
    assert cache.get_mask_sizes(query_length=2, layer_idx=0) == (8, 0)
    with torch.no_grad():
        keys, values = cache.update(*kv(2), layer_idx=0)
    assert keys.shape == values.shape == (B, H, 8, D)


def test_rebuild_sees_first_j_chunks_and_keeps_fresh_kv_on_the_graph():
    cache = ChunkCache(total_length=8)
    written = record_chunks(cache, [3, 3, 2])
    cache.prepare(num_past=1, record=False)  # rebuild chunk 1 on chunk 0
    assert cache.get_seq_length() == 3
    assert cache.get_mask_sizes(query_length=3, layer_idx=1) == (6, 0)
    fresh = [kv(3, requires_grad=True) for _ in range(LAYERS)]
    outputs = [cache.update(k, v, layer) for layer, (k, v) in enumerate(fresh)]
    assert cache.num_chunks == 3  # nothing new recorded
    assert all(a is b for a, b in zip(cache.fresh_kv(), [t for pair in fresh for t in pair]))
    for layer, (keys, values) in enumerate(outputs):
        assert keys.shape == (B, H, 6, D) and keys.grad_fn is not None
        assert torch.equal(keys[:, :, :3], written[0][layer][0])
        assert torch.equal(keys[:, :, 3:], fresh[layer][0]) and torch.equal(values[:, :, 3:], fresh[layer][1])
    # Gradient through the returned past is added into chunk 0's relay; the chunk's own part reaches the
    # fresh tensors; chunks 1 and 2 receive nothing.
    weights = torch.arange(6.0).view(1, 1, 6, 1)
    torch.stack([(k * weights).sum() + 2 * (v * weights).sum() for k, v in outputs]).sum().backward()
    for layer in range(LAYERS):
        k_relay, v_relay = cache.relay(0)[2 * layer : 2 * layer + 2]
        assert torch.equal(k_relay, weights[:, :, :3].expand(B, H, 3, D)) and torch.equal(v_relay, 2 * k_relay)
        assert torch.equal(fresh[layer][0].grad, weights[:, :, 3:].expand(B, H, 3, D))
    # (Issue 20: a chunk no later chunk read gets no relay at all, None, rather than zeros: stage 2 may skip it.)
    assert all(g is None for g in cache.relay(1) + cache.relay(2))


def test_relay_sums_what_every_later_chunk_sends():
    cache = ChunkCache(total_length=6)
    record_chunks(cache, [2, 2, 2])
    for chunk in (2, 1):  # stage 2 order
        cache.prepare(num_past=chunk, record=False)
        keys, values = cache.update(*kv(2, requires_grad=True), layer_idx=0)
        (keys.sum() + values.sum()).backward()
    assert torch.equal(cache.relay(0)[0], torch.full((B, H, 2, D), 2.0))  # read by chunks 1 and 2
    assert torch.equal(cache.relay(1)[0], torch.full((B, H, 2, D), 1.0))  # read by chunk 2 only


def test_freed_chunk_cannot_be_used_as_past():
    cache = ChunkCache(total_length=6)
    record_chunks(cache, [2, 2, 2])
    cache.free(2)  # the last chunk's checkpoint may go once it has been rebuilt
    cache.free(1)
    cache.prepare(num_past=1, record=False)  # chunk 1 only needs chunk 0: fine
    with pytest.raises(RuntimeError, match="freed"):
        cache.prepare(num_past=2, record=False)


def test_stage1_records_in_order():
    cache = ChunkCache(total_length=2)
    record_chunks(cache, [2])
    with pytest.raises(RuntimeError, match="in order"):
        cache.prepare(num_past=0, record=True)


def test_a_narrowed_past_relays_only_into_what_it_read():
    """Packed rows: a chunk that reads keys from `first` on relays nothing before it; an earlier chunk whose past
    starts earlier extends the summed gradient downwards (zero where no gradient arrived)."""
    cache = ChunkCache(total_length=10)
    written = record_chunks(cache, [3, 3, 4])

    def rebuild(chunk, first, weight):
        cache.prepare(num_past=chunk, record=False, first=first)
        length = 3 if chunk < 2 else 4
        outputs = [cache.update(*kv(length, requires_grad=True), layer) for layer in range(LAYERS)]
        for layer, (keys, _) in enumerate(outputs):
            assert keys.shape[2] == 3 * chunk + length - first
            past = torch.cat([written[c][layer][0] for c in range(chunk)], dim=2)
            assert torch.equal(keys[:, :, : 3 * chunk - first], past[:, :, first:])
        torch.stack([weight * k.sum() + v.sum() for k, v in outputs]).sum().backward()
        cache.free(chunk)

    rebuild(2, first=4, weight=1.0)  # keys 4..9: chunk 0 is not read, chunk 1 only from token 4
    assert all(g is None for g in cache.relay(0))
    k_relay = cache.relay(1)[0]
    assert torch.equal(k_relay[:, :, :1], torch.zeros(B, H, 1, D)) and torch.equal(k_relay[:, :, 1:], torch.ones(B, H, 2, D))
    rebuild(1, first=1, weight=2.0)  # keys 1..5: chunk 0 from token 1
    k_relay = cache.relay(0)[0]
    assert torch.equal(k_relay[:, :, :1], torch.zeros(B, H, 1, D)) and torch.equal(k_relay[:, :, 1:], torch.full((B, H, 2, D), 2.0))
