"""`ChunkCache`: a transformers `Cache` that holds a chunked sequence's KV cache for SeCO/SpaCO.

Shape contract: every key/value tensor is `[B, H_kv, S, D]` (batch, key/value heads, tokens, head
dim), exactly as transformers' attention layers hand them to `Cache.update`.

Storage: one buffer per layer and per K/V, `[B, H_kv, T, D]` for the whole sequence, allocated once.
Stage 1 (no autograd) writes each chunk's keys/values into its slot `[start, end)` and hands attention
a *view* of `[0, end)`: no concatenation, so no O(k²) copying and no second copy of the past kept
alive for backward (DESIGN.md §2's "m'_j" are these slots).

Gradients (the relay): in stage 2, chunk j is rebuilt with autograd on. Its fresh keys/values are
written into their slot and attention again gets the view `[0, end)`, through `_PastAndChunk`, whose
backward splits the incoming gradient: the part for the past `[0, start)` is *added into a gradient
buffer* of the same shape — dL/dm'_i for every earlier chunk i, summed over all later chunks — and the
part for `[start, end)` flows on to the fresh tensors (chunk j's own graph). When stage 2 reaches
chunk i, its slot of the gradient buffer is complete: that is the relay the engine seeds chunk i's
fresh KV with (`relay(i)`).

The cache has two modes, set by `ChunkCache.prepare` before each forward:

* record (stage 1): the forward's new keys/values are stored in the next slot;
* rebuild (stage 2): the new keys/values stay on the graph (kept in `fresh_kv()` for the relay).

In both modes the forward sees the first `num_past` chunks as its past.

Precision: under autocast the buffers (and the gradient buffers) are in the autocast dtype, as SDPA
would compute attention, even where the model makes float32 keys (RoPE's float32 tables promote
them): half the memory, and no cast of the whole past per layer. Softmax statistics stay float32 in
the attention kernels.

Layout: buffers are stored time-major (`[T, B, H_kv, D]` memory seen as `[B, H_kv, T, D]`), so that
a range of tokens is one contiguous piece of memory (one DMA transfer when offloaded).

Offload (`offload=True`): the KV buffers and their gradient buffers live in host memory (pinned when
the model is on a GPU), allocated once per step. Attention then gets host views and, handed over with
them, an `OffloadedPast` (`chunkwise.attention.offload`): with a fused kernel it streams the past to the device a
block at a time on a side stream, overlapped with compute, and adds each block's KV gradient into the
host gradient buffers the same way; otherwise `_BlockedAttention` copies blocks itself. Either way the
device holds one chunk's activations and a few blocks of keys, whatever the length.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from chunkwise.attention.offload import BlockStreamer, OffloadedPast, hand_over, time_major


def storage_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype the cache keeps `states` in: the autocast dtype where autocast is on and narrower."""
    device_type = states.device.type
    if states.is_floating_point() and torch.is_autocast_enabled(device_type):
        narrow = torch.get_autocast_dtype(device_type)
        if narrow.itemsize < states.dtype.itemsize:
            return narrow
    return states.dtype


class _PastAndChunk(torch.autograd.Function):
    """`buffer[:, :, first:end]` with the fresh chunk written at `[start, end)`; backward relays the past's part.

    Forward: writes `fresh` `[B, H, c, D]` into `buffer[:, :, start:end]` and returns the view of
    `[first, end)` (`first` > 0: a packed row whose chunk reads no key before it). Backward: adds the gradient
    of `[first, start)` into `grads.accumulate(...)` (the KV gradients of earlier chunks) and returns the
    gradient of `[start, end)` for `fresh`.
    """

    @staticmethod
    def forward(ctx, fresh, buffer, grads, slot, start, first=0):
        end = start + fresh.shape[-2]
        buffer[:, :, start:end] = fresh  # a device-to-host copy when the buffer is offloaded
        ctx.grads, ctx.slot, ctx.start, ctx.first, ctx.device, ctx.dtype = grads, slot, start, first, fresh.device, fresh.dtype
        return buffer[:, :, first:end]

    @staticmethod
    def backward(ctx, grad):
        past = ctx.start - ctx.first
        if past > 0:
            ctx.grads.accumulate(ctx.slot, grad[:, :, :past], first=ctx.first)
        return grad[:, :, past:].to(ctx.device, ctx.dtype), None, None, None, None, None


class ChunkLayer(CacheLayerMixin):
    """One attention layer's KV buffers and KV-gradient buffers (see the module docstring).

    Keeps every past token, also for sliding-window layers: the model's own mask hides what is out of
    the window, so the gradient is exact whatever the window; trimming is a memory optimisation.
    """

    is_sliding = False

    def __init__(self, total_length: int, offload: bool = False, streamer: BlockStreamer | None = None):
        super().__init__()
        self.total_length = total_length
        self.offload = offload
        self.streamer = streamer  # offload: the step's host<->device copies
        self.next_layer: ChunkLayer | None = None  # offload: whose first block to prefetch
        self.stored: list[torch.Tensor] = []  # [keys, values], each [B, H_kv, T, D], time-major
        self.gradients: list[torch.Tensor | None] = [None, None]  # allocated when a gradient first arrives
        # Tokens [lo, hi) of each gradient buffer hold a sum (None: nothing arrived); the rest is unwritten
        # memory. Stage 2 runs from the last chunk back, so the first gradient to arrive covers every later
        # one, except in a packed row, where an earlier chunk's past may start earlier (then the buffer is
        # extended down, zero-filled where no gradient arrived).
        self.summed: list[tuple[int, int] | None] = [None, None]
        self.past_length = 0
        self.past_first = 0  # a packed row: the first key the chunk may read
        self.record = True
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.stored = [
            time_major(batch, heads, self.total_length, states.shape[-1], dtype=storage_dtype(states), **self._home(states))
            for states in (key_states, value_states)
        ]
        self.state_dtypes = [key_states.dtype, value_states.dtype]  # what the model makes (and its relay seeds)
        self.device = key_states.device
        self.is_initialized = True

    def _home(self, states: torch.Tensor) -> dict:
        # Pinned host memory makes the host<->device copies asynchronous.
        return {"device": "cpu", "pin_memory": states.is_cuda} if self.offload else {"device": states.device}

    def gradient_buffer(self, slot: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The gradient buffer of keys (slot 0) or values (slot 1), allocated once per step, and the tokens
        `[lo, hi)` that hold a sum (None if none does)."""
        if self.gradients[slot] is None:
            stored = self.stored[slot]
            home = {"device": "cpu", "pin_memory": self.device.type == "cuda"} if self.offload else {"device": stored.device}
            self.gradients[slot] = time_major(*stored.shape, dtype=stored.dtype, **home)
        return self.gradients[slot], self.summed[slot]

    def mark_summed(self, slot: int, lo: int, hi: int) -> None:
        """Tokens `[lo, hi)` of the slot's buffer now hold a sum (the region is one interval: see `cover`)."""
        region = self.summed[slot]
        self.summed[slot] = (lo, hi) if region is None else (min(lo, region[0]), max(hi, region[1]))

    def cover(self, slot: int, lo: int, hi: int) -> bool:
        """Make the summed region include `[lo, hi)`, zero-filling what no gradient reached; False if nothing had
        arrived (then the caller writes `[lo, hi)` instead of adding into it)."""
        region = self.summed[slot]
        if region is None:
            return False
        if self.streamer is not None:
            self.streamer.synchronize()  # the host is about to touch buffers the side stream may be writing
        buffer = self.gradient_buffer(slot)[0]
        if lo < region[0]:
            buffer[:, :, lo : region[0]] = 0
        if hi > region[1]:
            buffer[:, :, region[1] : hi] = 0
        self.mark_summed(slot, lo, hi)
        return True

    def accumulate(self, slot: int, gradient: torch.Tensor, *, first: int = 0) -> None:
        """Add a gradient for tokens `[first, first + gradient.shape[-2])` of keys (slot 0) or values (slot 1)."""
        end = first + gradient.shape[-2]
        if self.cover(slot, first, end):
            buffer = self.gradient_buffer(slot)[0]
            buffer[:, :, first:end] += gradient.to(buffer.device)
            return
        if self.streamer is not None:
            self.streamer.synchronize()
        buffer = self.gradient_buffer(slot)[0]
        buffer[:, :, first:end] = gradient
        self.mark_summed(slot, first, end)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take this chunk's keys/values `[B, H_kv, c, D]`; return views of past + new, `[B, H_kv, S_past + c, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.past_length, self.past_length + key_states.shape[-2]
        if end > self.total_length:
            raise RuntimeError(f"ChunkCache was sized for {self.total_length} tokens; a chunk ending at {end} does not fit")
        if self.record:
            with torch.no_grad():  # stage 1: plain writes; the slots are what stage 2 rebuilds on
                for buffer, states in zip(self.stored, (key_states, value_states)):
                    buffer[:, :, start:end] = states
            keys, values = self.stored[0][:, :, self.past_first : end], self.stored[1][:, :, self.past_first : end]
        else:
            self.fresh = (key_states, value_states)
            keys = _PastAndChunk.apply(key_states, self.stored[0], self, 0, start, self.past_first)
            values = _PastAndChunk.apply(value_states, self.stored[1], self, 1, start, self.past_first)
        if self.offload:
            self._hand_over(keys, values, key_states, value_states)
        return keys, values

    def _hand_over(self, keys, values, key_states, value_states) -> None:
        """Offload: let the attention stream the past itself (see `chunkwise.attention.offload`)."""
        following = self.next_layer
        hand_over(keys, values, OffloadedPast(
            keys=self.stored[0],
            values=self.stored[1],
            length=self.past_length,
            fresh_keys=key_states.to(self.stored[0].dtype),  # rounded as the stored copy is
            fresh_values=value_states.to(self.stored[1].dtype),
            sink=None if self.record else self,
            streamer=self.streamer,
            next_layer=tuple(following.stored) if following is not None and following.is_initialized else None,
            first=self.past_first,
        ))

    def relay(self, start: int, end: int) -> list[torch.Tensor | None]:
        """dL/d(keys), dL/d(values) of tokens [start, end) gathered from later chunks (None: none arrived).

        On the model's device and in the dtype the model makes them, also when the buffers are
        offloaded or narrower (autocast).
        """
        if self.streamer is not None:
            self.streamer.order_after_copies()  # gradient blocks may still be on their way to the host
        relayed = []
        for g, summed, dtype in zip(self.gradients, self.summed, self.state_dtypes):
            lo, hi = (0, 0) if summed is None else (max(start, summed[0]), min(end, summed[1]))
            if g is None or lo >= hi:  # no later chunk read these tokens (or none sent a gradient)
                relayed.append(None)
                continue
            part = g[:, :, lo:hi].to(self.device, dtype, non_blocking=g.is_pinned())
            if hi - lo < end - start:  # tokens no later chunk sent a gradient to: zero
                shape = part.shape[:2]
                part = torch.cat([part.new_zeros(*shape, lo - start, part.shape[-1]), part,
                                  part.new_zeros(*shape, end - hi, part.shape[-1])], dim=2)
            relayed.append(part)
        return relayed

    def relay_sq_per_token(self) -> torch.Tensor:
        """`[T]` float64: the squared norm of the KV gradient relayed so far into each token (0 where none)."""
        if self.streamer is not None:
            self.streamer.order_after_copies()
        out = torch.zeros(self.total_length, dtype=torch.float64)
        for g, summed in zip(self.gradients, self.summed):
            if g is not None and summed is not None:
                lo, hi = summed
                out[lo:hi] += torch.linalg.vector_norm(g[:, :, lo:hi], dim=(0, 1, 3)).double().cpu().square()
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past_length - self.past_first + query_length, self.past_first

    def get_seq_length(self) -> int:
        return self.past_length

    def get_max_length(self) -> int:
        return -1


class ChunkCache(Cache):
    """KV cache of a chunked sequence of `total_length` tokens, for the engine (see the module docstring).

    With `offload=True` the buffers are kept in host memory (see the module docstring).

    Layers are created lazily, one per layer that calls `update`, so the cache needs no knowledge of
    the model's depth.
    """

    def __init__(self, total_length: int, *, offload: bool = False):
        super().__init__(layer_class_to_replicate=partial(ChunkLayer, total_length, offload))
        self.total_length = total_length
        self.offload = offload
        self._chunk_lengths: list[int] = []
        self._freed: set[int] = set()
        self._streamer: BlockStreamer | None = None  # offload: created with the first layer (its device)
        # (number of past chunks, their total length, record?) for the next forward; see prepare().
        self._mode: tuple[int, int, bool, int] = (0, 0, True, 0)

    # ----- set-up before each forward -----------------------------------------------------------

    def prepare(self, *, num_past: int, record: bool, first: int = 0) -> None:
        """Make the next forward see the first `num_past` chunks as its past, from token `first` on.

        Args:
            num_past: how many stored chunks precede the chunk about to run.
            record: True in stage 1 (store the new KV as chunk `num_past`), False in stage 2 (keep the
                new KV attached to the graph, see `fresh_kv`).
            first: the first key the chunk may read (a packed row, `chunkwise.core.documents`): attention gets
                keys `[first, end)`, and no gradient is relayed to the tokens before it.
        """
        if record and num_past != self.num_chunks:
            raise RuntimeError(f"stage 1 records chunks in order: expected chunk {self.num_chunks}, got {num_past}")
        if any(chunk < num_past and self._bounds(chunk)[1] > first for chunk in self._freed):
            raise RuntimeError("a chunk was freed while a later chunk still needs it as its past")
        past_length = sum(self._chunk_lengths[:num_past])
        if not 0 <= first <= past_length:
            raise RuntimeError(f"the first key {first} lies outside the past [0, {past_length}]")
        self._mode = (num_past, past_length, record, first)
        for layer in self.layers:
            self._configure(layer)

    def _configure(self, layer: ChunkLayer) -> None:
        _, past_length, record, first = self._mode
        layer.record, layer.fresh, layer.past_length, layer.past_first = record, None, past_length, first

    def commit(self, chunk_length: int) -> None:
        """Note the length of the chunk stage 1 just recorded (call after its forward)."""
        self._chunk_lengths.append(chunk_length)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # Layers are created on first use; a new one follows the mode prepare() set.
        if self.offload and self._streamer is None:
            self._streamer = BlockStreamer(key_states.device)
        while len(self.layers) <= layer_idx:
            self.layers.append(ChunkLayer(self.total_length, self.offload, self._streamer))
            if len(self.layers) > 1:
                self.layers[-2].next_layer = self.layers[-1]
            self._configure(self.layers[-1])
        return self.layers[layer_idx].update(key_states, value_states)

    # ----- access for the engine ----------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        """Number of chunks recorded so far."""
        return len(self._chunk_lengths)

    def _bounds(self, chunk: int) -> tuple[int, int]:
        start = sum(self._chunk_lengths[:chunk])
        return start, start + self._chunk_lengths[chunk]

    def stored(self, chunk: int) -> list[torch.Tensor]:
        """Views of `chunk`'s stored keys/values, flattened as `[k_0, v_0, k_1, v_1, ...]` over layers."""
        start, end = self._bounds(chunk)
        return [buffer[:, :, start:end] for layer in self.layers for buffer in layer.stored]

    def relay(self, chunk: int) -> list[torch.Tensor | None]:
        """The KV gradient later chunks sent to `chunk`, in the order of `stored` (None where none arrived)."""
        start, end = self._bounds(chunk)
        return [g for layer in self.layers for g in layer.relay(start, end)]

    def relay_norms(self, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """`[k]` float64 (CPU): the L2 norm of the KV gradient relayed so far into each chunk `[start, end)` of
        `bounds`, over every layer's keys and values (what a policy deciding in stage 2 reads)."""
        per_token = torch.zeros(self.total_length, dtype=torch.float64)
        for layer in self.layers:
            per_token += layer.relay_sq_per_token()
        return torch.stack([per_token[start:end].sum() for start, end in bounds]).sqrt()

    def fresh_kv(self) -> list[torch.Tensor]:
        """The graph-connected KV of the chunk just rebuilt, in the same order as `stored`."""
        return [t for layer in self.layers for t in layer.fresh]

    def free(self, chunk: int) -> None:
        """Mark `chunk` done: no chunk rebuilt after it may read it (its slot is overwritten no more)."""
        self._freed.add(chunk)
        for layer in self.layers:
            layer.fresh = None
