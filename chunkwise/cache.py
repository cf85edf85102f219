"""`ChunkCache`: a transformers `Cache` that holds the KV cache as per-chunk checkpoints.

Shape contract: every key/value tensor is `[B, H_kv, S, D]` (batch, key/value heads, tokens, head
dim), exactly as transformers' attention layers hand them to `Cache.update`. Chunk j's checkpoint
holds its own tokens only, `S = len(chunk j)`.

Why checkpoints are detached leaves with `requires_grad=True` (DESIGN.md §2): stage 1 runs without
autograd, so the stored keys/values carry no graph and no activations. In stage 2, when chunk i > j is
rebuilt on top of them, autograd treats them as leaves and accumulates dL/dm'_j into `m'_j.grad` —
the gradient later chunks send back through attention. That gradient is what stage 2 relays into
chunk j's own rebuilt graph.

The cache has two modes, set by `ChunkCache.prepare` before each forward:

* record (stage 1): the forward's new keys/values are stored as the next checkpoint;
* rebuild (stage 2): the new keys/values stay attached to the graph and are kept in `fresh_kv()` for
  the relay; nothing is stored.

In both modes the forward sees the first `num_past` checkpoints as its past.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class ChunkLayer(CacheLayerMixin):
    """One attention layer's per-chunk KV checkpoints.

    Keeps every past token, also for sliding-window layers: the model's own mask hides what is out of
    the window, so the gradient is exact whatever the window; trimming is a memory optimisation.
    """

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.checkpoints: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.num_past = 0
        self.past_length = 0
        self.record = True
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take this chunk's keys/values `[B, H_kv, c, D]`; return past + new, `[B, H_kv, S_past + c, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.record:
            # Detach: no graph is kept in stage 1. requires_grad: stage 2 gathers dL/dm' here.
            self.checkpoints.append(
                (key_states.detach().requires_grad_(True), value_states.detach().requires_grad_(True))
            )
        else:
            self.fresh = (key_states, value_states)
        past = self.checkpoints[: self.num_past]
        if not past:
            return key_states, value_states
        keys = torch.cat([k for k, _ in past] + [key_states], dim=-2)
        values = torch.cat([v for _, v in past] + [value_states], dim=-2)
        return keys, values

    def show_past(self, num_past: int, past_length: int) -> None:
        if any(c is None for c in self.checkpoints[:num_past]):
            raise RuntimeError("a chunk checkpoint was freed while a later chunk still needs it as its past")
        self.num_past, self.past_length = num_past, past_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.past_length

    def get_max_length(self) -> int:
        return -1


class ChunkCache(Cache):
    """KV cache of a chunked sequence, as per-chunk checkpoints per layer (see the module docstring).

    Layers are created lazily, one per layer that calls `update`, so the cache needs no knowledge of
    the model's depth.
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=ChunkLayer)
        self._chunk_lengths: list[int] = []
        # (number of past chunks, their total length, record?) for the next forward; see prepare().
        self._mode: tuple[int, int, bool] = (0, 0, True)

    # ----- set-up before each forward -----------------------------------------------------------

    def prepare(self, *, num_past: int, record: bool) -> None:
        """Make the next forward see the first `num_past` checkpoints as its past.

        Args:
            num_past: how many stored chunks precede the chunk about to run.
            record: True in stage 1 (store the new KV as checkpoint `num_past`), False in stage 2
                (keep the new KV attached to the graph, see `fresh_kv`).
        """
        if record and num_past != self.num_chunks:
            raise RuntimeError(f"stage 1 records chunks in order: expected chunk {self.num_chunks}, got {num_past}")
        self._mode = (num_past, sum(self._chunk_lengths[:num_past]), record)
        for layer in self.layers:
            self._configure(layer)

    def _configure(self, layer: ChunkLayer) -> None:
        num_past, past_length, record = self._mode
        layer.record = record
        layer.fresh = None
        layer.show_past(num_past, past_length)

    def commit(self, chunk_length: int) -> None:
        """Note the length of the chunk stage 1 just recorded (call after its forward)."""
        self._chunk_lengths.append(chunk_length)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # Layers are created on first use; a new one follows the mode prepare() set.
        while len(self.layers) <= layer_idx:
            self.layers.append(ChunkLayer())
            self._configure(self.layers[-1])
        return self.layers[layer_idx].update(key_states, value_states)

    # ----- access for the engine ----------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        """Number of chunks recorded so far."""
        return len(self._chunk_lengths)

    def checkpoint(self, chunk: int) -> list[torch.Tensor]:
        """The stored KV leaves of `chunk`, flattened as `[k_0, v_0, k_1, v_1, ...]` over layers."""
        return [t for layer in self.layers for t in layer.checkpoints[chunk]]

    def fresh_kv(self) -> list[torch.Tensor]:
        """The graph-connected KV of the chunk just rebuilt, in the same order as `checkpoint`."""
        return [t for layer in self.layers for t in layer.fresh]

    def free(self, chunk: int) -> None:
        """Drop `chunk`'s checkpoint and its gradient: no chunk rebuilt after it reads it."""
        for layer in self.layers:
            if chunk < len(layer.checkpoints):  # the last chunk was never stored
                layer.checkpoints[chunk] = None
            layer.fresh = None


# ----- inference: one preallocated buffer per layer ---------------------------------------------------


class BufferLayer(CacheLayerMixin):
    """One layer's KV for chunked inference: a `[B, H_kv, total_length, D]` buffer filled chunk by chunk.

    Why not transformers' `DynamicCache`: it concatenates the whole past with every chunk, which copies
    O(k²) data over k chunks and leaves the allocator with a trail of ever larger freed blocks. Here each
    chunk's keys/values are written once, in place, and attention reads a view of the filled prefix, so
    memory is exactly the KV of the document, allocated once.
    """

    is_sliding = False  # every token is kept; the model's own mask applies any sliding window

    def __init__(self, total_length: int):
        super().__init__()
        self.total_length = total_length
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, key_dim = key_states.shape
        self.keys = key_states.new_empty(batch, heads, self.total_length, key_dim)
        self.values = value_states.new_empty(batch, heads, self.total_length, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write this chunk's `[B, H_kv, c, D]` after the past; return views of all `[B, H_kv, S_past + c, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.total_length:
            raise RuntimeError(f"PreallocatedCache holds {self.total_length} tokens; a chunk ending at {end} does not fit")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.total_length


class PreallocatedCache(Cache):
    """KV cache for no-grad chunked inference over a sequence of known length (see `BufferLayer`)."""

    def __init__(self, total_length: int):
        super().__init__(layer_class_to_replicate=partial(BufferLayer, total_length))
        self.total_length = total_length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(BufferLayer(self.total_length))
        return self.layers[layer_idx].update(key_states, value_states)
