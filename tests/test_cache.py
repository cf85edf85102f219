"""ChunkCache: per-chunk KV leaves, views of "the first j chunks", gradient access, freeing."""

import pytest
import torch

from chunkwise.cache import ChunkCache

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


def test_stage1_stores_detached_leaves_that_require_grad():
    cache = ChunkCache()
    written = record_chunks(cache, [3, 3, 2])
    assert cache.num_chunks == 3 and len(cache.layers) == LAYERS
    for chunk, per_layer in enumerate(written):
        leaves = cache.checkpoint(chunk)
        assert len(leaves) == 2 * LAYERS
        expected = [t for pair in per_layer for t in pair]
        for leaf, original in zip(leaves, expected):
            assert leaf.is_leaf and leaf.requires_grad and leaf.grad_fn is None
            assert leaf.shape == original.shape == (B, H, original.shape[2], D)
            assert torch.equal(leaf, original)


def test_stage1_forward_sees_the_growing_past():
    cache = ChunkCache()
    record_chunks(cache, [3, 3])
    cache.prepare(num_past=2, record=True)
    assert cache.get_seq_length() == 6
    assert cache.get_mask_sizes(query_length=2, layer_idx=0) == (8, 0)
    with torch.no_grad():
        keys, values = cache.update(*kv(2), layer_idx=0)
    assert keys.shape == values.shape == (B, H, 8, D)


def test_rebuild_sees_first_j_chunks_and_keeps_fresh_kv_on_the_graph():
    cache = ChunkCache()
    written = record_chunks(cache, [3, 3, 2])
    cache.prepare(num_past=1, record=False)  # rebuild chunk 1 on chunk 0
    assert cache.get_seq_length() == 3
    assert cache.get_mask_sizes(query_length=3, layer_idx=1) == (6, 0)
    fresh = [kv(3, requires_grad=True) for _ in range(LAYERS)]
    outputs = [cache.update(k, v, layer) for layer, (k, v) in enumerate(fresh)]
    assert cache.num_chunks == 3  # nothing new stored
    assert all(a is b for a, b in zip(cache.fresh_kv(), [t for pair in fresh for t in pair]))
    for layer, (keys, values) in enumerate(outputs):
        assert keys.shape == (B, H, 6, D)
        assert torch.equal(keys[:, :, :3], written[0][layer][0])
        assert keys[:, :, 3:] is not None and torch.equal(keys[:, :, 3:], fresh[layer][0])
    # Gradient through the returned past lands in the stored leaves of chunk 0, not of chunk 1 or 2.
    torch.stack([k.sum() + v.sum() for k, v in outputs]).sum().backward()
    assert all(torch.equal(leaf.grad, torch.ones_like(leaf)) for leaf in cache.checkpoint(0))
    assert all(leaf.grad is None for leaf in cache.checkpoint(1) + cache.checkpoint(2))


def test_freed_chunk_cannot_be_used_as_past():
    cache = ChunkCache()
    record_chunks(cache, [2, 2, 2])
    cache.free(2)  # the last chunk's checkpoint may go once it has been rebuilt
    cache.free(1)
    cache.prepare(num_past=1, record=False)  # chunk 1 only needs chunk 0: fine
    with pytest.raises(RuntimeError, match="freed"):
        cache.prepare(num_past=2, record=False)


def test_stage1_records_in_order():
    cache = ChunkCache()
    record_chunks(cache, [2])
    with pytest.raises(RuntimeError, match="in order"):
        cache.prepare(num_past=0, record=True)
