"""Host-resident KV cache blocks streamed to the device, overlapped with compute.

With `offload_kv=True` the `ChunkCache` keeps every layer's keys/values and their gradients in host
memory (pinned when the model is on a GPU). The engine's attention reads the past a block of keys at a
time (`BlockStreamer`):

* forward: while block i is computed, block i+1 is copied on a side stream into the other of two
  device buffers; the compute stream waits for a block's copy (an event) before using it, and the side
  stream waits until the compute stream is done with a buffer (another event) before overwriting it.
  During a layer's last block, the next layer's first block is fetched (`warm_up`).
* backward: the same for keys/values; each block's key/value gradient is added to the gradient
  accumulated so far by later chunks (fetched with the block, added on the device) and copied back to
  the host on the side stream, ordered after the add by an event.

Host buffers are allocated once per step (by the cache), device buffers once per step and role (here).
Host and device blocks share one memory layout, time-major (`[T, B, H_kv, D]` storage seen as
`[B, H_kv, T, D]`), so that a block of tokens is one contiguous range of bytes and each copy is one
DMA transfer. On a device without streams (CPU) the same code runs with plain synchronous copies, which
is how the tests check that offloading changes no bit of the gradient.

`hand_over` / `claim` pass a layer's `OffloadedPast` from the cache to the attention function, which
transformers calls right after `Cache.update` with the tensors the cache returned.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


def time_major(batch: int, heads: int, length: int, dim: int, **options) -> torch.Tensor:
    """An empty `[B, H, T, D]` tensor stored as `[T, B, H, D]`: a range of tokens is contiguous memory."""
    return torch.empty(length, batch, heads, dim, **options).permute(1, 2, 0, 3)


class BlockStreamer:
    """Copies blocks between host and device on a side stream, ordered by events (see the module docstring).

    Roles are positions in the lists passed to `fetch` (e.g. keys, values, key gradients, value
    gradients); each role has two device buffers used in turn.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._buffers: dict[int, list[torch.Tensor]] = {}  # role -> two flat device buffers
        self._done_with: dict[tuple[int, int], torch.cuda.Event] = {}  # (role, buffer) -> compute finished it
        self._turn: dict[int, int] = {}
        self._warm: tuple | None = None  # (host views' identity, fetched block) from `warm_up`

    # ----- events: all no-ops without a side stream ---------------------------------------------------

    def _record(self, stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.side is not None else None

    # ----- host -> device --------------------------------------------------------------------------------

    def _buffer(self, role: int, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The next device buffer of `role`, viewed like `like` (time-major), once the compute stream is done with it."""
        turn = self._turn.get(role, 0)
        self._turn[role] = 1 - turn
        buffers = self._buffers.setdefault(role, [None, None])
        flat = buffers[turn]
        if flat is None or flat.numel() < like.numel() or flat.dtype != like.dtype:
            flat = buffers[turn] = torch.empty(like.numel(), dtype=like.dtype, device=self.device)
            if self.side is not None:
                flat.record_stream(self.side)  # written on the side stream: keep it alive for its copies
        done = self._done_with.pop((role, turn), None)
        if done is not None:
            self.side.wait_event(done)
        batch, heads, length, dim = like.shape
        view = flat[: like.numel()].view(length, batch, heads, dim).permute(1, 2, 0, 3)
        return view, (role, turn)

    def fetch(self, sources: list[torch.Tensor]) -> tuple:
        """Start copying host blocks `sources` (`[B, H, n, D]` time-major views) to the device."""
        # Buffers are taken (and allocated, on the compute stream) outside the side stream's context.
        targets, slots = zip(*(self._buffer(role, source) for role, source in enumerate(sources)))
        with torch.cuda.stream(self.side) if self.side is not None else _nothing():
            for target, source in zip(targets, sources):
                target.copy_(source, non_blocking=self.side is not None)
        return list(targets), list(slots), self._record(self.side)

    def ready(self, fetched: tuple) -> list[torch.Tensor]:
        """The fetched device blocks, once their copies are done (the compute stream waits, the host does not)."""
        targets, _, copied = fetched
        if copied is not None:
            self._compute_stream().wait_event(copied)
        return targets

    def release(self, fetched: tuple) -> None:
        """The compute stream has queued its last use of these blocks: their buffers may be refilled after it."""
        _, slots, _ = fetched
        if self.side is not None:
            done = self._record(self._compute_stream())
            for slot in slots:
                self._done_with[slot] = done

    def blocks(self, sources: list[torch.Tensor], bounds: list[tuple[int, int]], *, then: tuple | None = None):
        """Yield the device copies of `[t[:, :, s:e] for t in sources]` for each (s, e), prefetching one ahead.

        `then`: `(sources, bound)` of the block wanted after these (the next layer's first), fetched
        during the last one (`warm_up`).
        """
        if not bounds:
            return
        fetched = self._take_warm(sources, bounds[0]) or self.fetch([t[:, :, slice(*bounds[0])] for t in sources])
        for index in range(len(bounds)):
            following = None
            if index + 1 < len(bounds):  # queue the next copy before this block's compute
                following = self.fetch([t[:, :, slice(*bounds[index + 1])] for t in sources])
            elif then is not None:
                self.warm_up(*then)
            yield self.ready(fetched)
            self.release(fetched)
            fetched = following

    def warm_up(self, sources: list[torch.Tensor], bound: tuple[int, int]) -> None:
        """Fetch the first block of what `blocks(sources, ...)` will be asked for next (the next layer)."""
        identity = tuple((t.data_ptr(), t.stride()) for t in sources)
        self._warm = (identity, bound, self.fetch([t[:, :, slice(*bound)] for t in sources]))

    def _take_warm(self, sources, bound):
        warm, self._warm = self._warm, None
        if warm is None:
            return None
        identity, warm_bound, fetched = warm
        if identity == tuple((t.data_ptr(), t.stride()) for t in sources) and warm_bound == bound:
            return fetched
        self.release(fetched)  # fetched for nothing: its buffers are free again
        return None

    # ----- device -> host ----------------------------------------------------------------------------

    def write_back(self, block: torch.Tensor, host: torch.Tensor) -> None:
        """Copy device `block` into the host view `host` after the compute stream's queued work, on the side stream."""
        if block.stride() != host.stride() or block.dtype != host.dtype:  # one contiguous transfer, not a staged one
            staged = time_major(*block.shape, dtype=host.dtype, device=block.device)
            staged.copy_(block)
            block = staged
        if self.side is None:
            host.copy_(block)
            return
        self.side.wait_event(self._record(self._compute_stream()))
        with torch.cuda.stream(self.side):
            host.copy_(block, non_blocking=True)
        block.record_stream(self.side)  # made on the compute stream, read on the side stream

    def synchronize(self) -> None:
        """Before the host reads or writes host buffers itself: wait for every copy."""
        if self.side is not None:
            self.side.synchronize()

    def order_after_copies(self) -> None:
        """Before the compute stream copies from host buffers the side stream writes: wait for those writes."""
        if self.side is not None:
            self._compute_stream().wait_stream(self.side)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass
class OffloadedPast:
    """One layer's host-resident past for the chunk being run, handed from the cache to the attention.

    Attributes:
        keys, values: host `[B, H_kv, T, D]` (time-major) buffers of the whole sequence.
        length: the past ends at token `length` of the buffers.
        first: the past starts at token `first` (0, or a packed row's first key the chunk may read).
        fresh_keys, fresh_values: the chunk's own keys/values on the device, `[B, H_kv, c, D]`, in the
            storage dtype; in stage 2 they are on the graph.
        sink: receives the past's key/value gradients (`ChunkLayer`), or None in stage 1.
        streamer: the step's `BlockStreamer`.
        next_layer: the next layer's (keys, values) host buffers, for `warm_up`, or None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int
    fresh_keys: torch.Tensor
    fresh_values: torch.Tensor
    sink: object | None
    streamer: BlockStreamer
    next_layer: tuple[torch.Tensor, torch.Tensor] | None = None
    first: int = 0


class _HandOver:
    """The one past handed over last, with the tensors it was handed over with (held weakly)."""

    def __init__(self):
        self.tensors: tuple = ()
        self.past: OffloadedPast | None = None

    def put(self, key: torch.Tensor, value: torch.Tensor, past: OffloadedPast) -> None:
        self.tensors, self.past = (weakref.ref(key), weakref.ref(value)), past

    def take(self, key: torch.Tensor, value: torch.Tensor) -> OffloadedPast | None:
        if not self.tensors or self.tensors[0]() is not key or self.tensors[1]() is not value:
            return None
        past, self.tensors, self.past = self.past, (), None
        return past


_hand_over = _HandOver()


def hand_over(key: torch.Tensor, value: torch.Tensor, past: OffloadedPast) -> None:
    """Cache side: `key`/`value` (what `update` returns) stand for `past`."""
    _hand_over.put(key, value, past)


def claim(key: torch.Tensor, value: torch.Tensor) -> OffloadedPast | None:
    """Attention side: the `OffloadedPast` behind exactly these tensors, or None (then use them as they are)."""
    return _hand_over.take(key, value)
