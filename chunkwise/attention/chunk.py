"""Attention for one chunk over its stored past: no repeated KV heads, no mask tensor, O(chunk) saved state.

Why the engine brings its own attention. With transformers' SDPA attention, a chunk of `c` queries
over `S` keys (its past plus itself) keeps, per layer, for backward:

* `repeat_kv`'s copy of K/V for every query head (GQA models): `H / H_kv` × the KV cache, because SDPA
  only takes grouped heads without a mask;
* the causal mask `[B, 1, c, S]`, which SDPA turns into floats: 4·c bytes per key.

Both are kept for every layer of the chunk being backpropagated, so SeCO's memory grew by 2.5× the KV
cache plus its gradient per extra token on the benchmark model (docs/benchmarks.md). Here attention is
split in two parts that need neither:

* the past (keys `0 .. S-c`): every query sees every key, so no mask. The `G = H / H_kv` query heads
  that share a KV head are folded into the query axis (`[B, H_kv, G·c, D]`), so the past is read in
  place, not copied;
* the chunk's own keys: plain causal over `c × c`, with its (chunk-sized) K/V repeated per head.

The two softmaxes are merged through their log-sum-exps, as flash attention merges key blocks. Backward
runs each part's backward with the *merged* output and log-sum-exp, which gives each part its exact
share of the gradient (as ring attention does). What stays alive per layer: views of the cache's K/V
buffers and chunk-sized tensors.

Two implementations of the same function:

* `_SplitAttention`: each part is one call of a fused kernel that returns its log-sum-exp
  (`chunkwise.attention.kernels`: PyTorch's CPU flash kernel; on CUDA its flash, memory-efficient or cuDNN
  kernel), chosen per device, dtype and head dim, and checked against float64 math attention the first
  time it is used in the process. The past is cut into `PAST_BLOCK`-key blocks merged one by one. With an
  offloaded cache, `_OffloadedSplitAttention` runs the same arithmetic on blocks streamed from the host
  (`chunkwise.attention.offload`).
* `_BlockedAttention` (the last resort: no kernel passed its check, e.g. float64 on a GPU): plain
  tensor ops, the keys processed in blocks with an online softmax.

`chunk_attention_forward` is registered with transformers' `AttentionInterface` as "chunkwise_sdpa".
The engine switches a model whose attention is "sdpa" to it for the duration of a step
(`chunk_attention`). It takes the case it was written for, exactly: a causal layer, no dropout, no
soft-capping, sinks or position bias, and a mask that is the plain causal one (no padding, no sliding
window shorter than the keys) or a packed row's per-document mask the engine built and registered (run one
document at a time, `chunkwise.attention.documents`). Anything else goes to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chunkwise.attention.documents import DocumentSegments, document_attention, segments_of
from chunkwise.attention.kernels import CPU_FLASH, PartKernel, merge_parts, select_kernel
from chunkwise.attention.offload import OffloadedPast, claim

ATTENTION_NAME = "chunkwise_sdpa"
ATTENTION_CHOICES = ("chunkwise", "model")


# ----- fused kernels (chunkwise.attention.kernels), run on the two parts ----------------------------------------

# Keys of the past per kernel call. The past is cut at multiples of this, offloaded or not, so that
# offloading changes no bit of the result; an offloaded past streams to the device in blocks this long.
PAST_BLOCK = 8192


def _as_rows(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, H, c, X]` -> `[B, H_kv, G·c, X]`: the G heads sharing a KV head become rows (head h·G+g, query t -> row g·c+t)."""
    batch, heads, chunk = tensor.shape[:3]
    return tensor.reshape(batch, kv_heads, heads // kv_heads * chunk, *tensor.shape[3:])


def _past_bounds(past: int, first: int = 0) -> list[tuple[int, int]]:
    """`PAST_BLOCK`-key blocks of the past `[first, past)`, cut from its first key (offloaded or not: the same cuts)."""
    return [(start, min(start + PAST_BLOCK, past)) for start in range(first, past, PAST_BLOCK)]


def _own_part(query, own_key, own_value, scale, kernel: PartKernel):
    """The chunk over its own keys, causal; K/V repeated to the query heads (chunk-sized copies)."""
    groups = query.shape[1] // own_key.shape[1]
    output, lse, state = kernel.forward(
        query, repeat_kv(own_key, groups), repeat_kv(own_value, groups), causal=True, scale=scale
    )
    return output, lse.to(torch.promote_types(lse.dtype, torch.float32)), state


def _add_past(output, lse, query, blocks, scale, kernel: PartKernel):
    """Merge the past's key blocks into (output, lse): grouped heads folded into rows, no mask. Returns
    (output, lse, one kernel state per block)."""
    kv_heads, states = None, []
    for keys, values in blocks:
        kv_heads = keys.shape[1]
        block_output, block_lse, state = kernel.forward(
            _as_rows(query, kv_heads), keys.to(query.dtype), values.to(query.dtype), causal=False, scale=scale
        )
        output, lse = merge_parts(output, lse, block_output.reshape(output.shape), block_lse.reshape(lse.shape))
        states.append(state)
    # Contiguous, like the gradient backward gets: some kernels want `out` and `grad_out` laid out alike.
    return output.to(query.dtype).contiguous(), lse, states


def _own_grads(grad_output, query, own_key, own_value, output, lse, state, scale, kernel: PartKernel):
    """(grad_query, grad_own_key, grad_own_value) of the own part, given the merged output and LSE."""
    batch, kv_heads = own_key.shape[:2]
    groups = query.shape[1] // kv_heads
    grad_query, grad_keys, grad_values = kernel.backward(
        grad_output, query, repeat_kv(own_key, groups), repeat_kv(own_value, groups), output, lse, state,
        causal=True, scale=scale,
    )
    # Each repeated head's gradient goes back to the KV head it was copied from.
    return grad_query, grad_keys.unflatten(1, (kv_heads, groups)).sum(2), grad_values.unflatten(1, (kv_heads, groups)).sum(2)


def _past_block_grads(grad_output, query, output, lse, keys, values, state, scale, kernel: PartKernel, grad_query):
    """(grad_keys, grad_values) of one past block; its query gradient is added into `grad_query`."""
    kv_heads = keys.shape[1]
    grad_rows, grad_keys, grad_values = kernel.backward(
        _as_rows(grad_output, kv_heads), _as_rows(query, kv_heads), keys.to(query.dtype), values.to(query.dtype),
        _as_rows(output, kv_heads), _as_rows(lse, kv_heads), state, causal=False, scale=scale,
    )
    grad_query += grad_rows.reshape(grad_query.shape)
    return grad_keys, grad_values


class _SplitAttention(torch.autograd.Function):
    """Causal attention of a chunk at the end of its keys, as past part + own part (module docstring).

    key/value `[B, H_kv, S, D]` hold the past and the chunk, on the queries' device; the past is read in
    `PAST_BLOCK` blocks of views, the kernel is a `chunkwise.kernels.PartKernel`.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, kernel: PartKernel = CPU_FLASH):
        # query [B, H, c, D]; key [B, H_kv, S, D]; value [B, H_kv, S, Dv]; S >= c.
        chunk = query.shape[2]
        past = key.shape[2] - chunk
        output, lse, own_state = _own_part(query, key[:, :, past:], value[:, :, past:], scale, kernel)
        blocks = [(key[:, :, s:e], value[:, :, s:e]) for s, e in _past_bounds(past)]
        output, lse, states = _add_past(output, lse, query, blocks, scale, kernel)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.scale, ctx.kernel, ctx.own_state, ctx.states = scale, kernel, own_state, states
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        with torch.autocast(grad_output.device.type, enabled=False):  # the caller's autocast is active here
            past = key.shape[2] - query.shape[2]
            grad_output = grad_output.contiguous()
            grad_query, grad_key, grad_value = _own_grads(
                grad_output, query, key[:, :, past:], value[:, :, past:], output, lse, ctx.own_state, ctx.scale, ctx.kernel
            )
            if past:
                grad_query = grad_query.to(lse.dtype)  # summed over the blocks in float32 (or wider)
                past_grads = [
                    _past_block_grads(
                        grad_output, query, output, lse, key[:, :, s:e], value[:, :, s:e], state, ctx.scale, ctx.kernel, grad_query
                    )
                    for (s, e), state in zip(_past_bounds(past), ctx.states)
                ]
                grad_key = torch.cat([*(g for g, _ in past_grads), grad_key], dim=2)
                grad_value = torch.cat([*(g for _, g in past_grads), grad_value], dim=2)
        return grad_query.to(query.dtype), grad_key, grad_value, None, None


def _stream_past_grads(ctx, past: OffloadedPast, grad_output, query, output, lse, grad_query) -> None:
    """Backward of an offloaded past: per block, fetch K/V (and the KV gradient later chunks accumulated),
    compute, add, write the sum back to the host — the copies on the streamer's side stream."""
    bounds = _past_bounds(past.length, past.first)
    # A fresh K (or V) without a graph means nothing trainable is upstream of it, nor of the past's:
    # that gradient is not relayed (as `_PastAndChunk` does).
    wanted = [slot for slot, needed in enumerate(ctx.needs_input_grad[1:3]) if needed]
    # Where later chunks already sent a gradient, this chunk's is added to it; the sink first zero-fills what
    # of [first, length) they did not reach (a packed row: their past may have started later).
    adding = [slot for slot in wanted if past.sink.cover(slot, past.first, past.length)]
    host = {slot: past.sink.gradient_buffer(slot)[0] for slot in wanted}
    sources = [past.keys, past.values, *(host[slot] for slot in adding)]
    for (start, end), blocks, state in zip(bounds, past.streamer.blocks(sources, bounds), ctx.states):
        grads = _past_block_grads(grad_output, query, output, lse, blocks[0], blocks[1], state, ctx.scale, ctx.kernel, grad_query)
        sums = dict(zip(adding, blocks[2:]))
        for slot in wanted:
            grad = grads[slot]
            if slot in sums:
                grad = sums[slot].add_(grad)  # the fetched sum of later chunks' gradients, plus this chunk's
            past.streamer.write_back(grad, host[slot][:, :, start:end])
    for slot in wanted:
        past.sink.mark_summed(slot, past.first, past.length)


def split_attention(query, key, value, scale: float, kernel: PartKernel) -> torch.Tensor:
    """`causal_chunk_attention` through one given part kernel (what the kernel self-check runs)."""
    return _SplitAttention.apply(query, key, value, scale, kernel)


class _OffloadedSplitAttention(torch.autograd.Function):
    """`_SplitAttention` over a past that lives in host memory (`chunkwise.offload.OffloadedPast`).

    Inputs are the chunk's own keys/values on the device; the past's blocks stream in from the host,
    and in backward the past's key/value gradients are added to the host gradient buffers block by
    block (`ChunkLayer.gradient_buffer`) instead of being returned: the device never holds the whole past.
    Block boundaries and arithmetic are those of `_SplitAttention`, so the results are the same bits.
    """

    @staticmethod
    def forward(ctx, query, own_key, own_value, scale: float, kernel: PartKernel, past: OffloadedPast):
        output, lse, own_state = _own_part(query, own_key, own_value, scale, kernel)
        bounds = _past_bounds(past.length, past.first)
        following = None
        if past.next_layer is not None and bounds:  # fetched while this layer's last block is computed
            following = (list(past.next_layer), bounds[0])
        blocks = past.streamer.blocks([past.keys, past.values], bounds, then=following)
        output, lse, states = _add_past(output, lse, query, blocks, scale, kernel)
        ctx.save_for_backward(query, own_key, own_value, output, lse)
        ctx.scale, ctx.kernel, ctx.own_state, ctx.states, ctx.past = scale, kernel, own_state, states, past
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, own_key, own_value, output, lse = ctx.saved_tensors
        past = ctx.past
        with torch.autocast(grad_output.device.type, enabled=False):
            grad_output = grad_output.contiguous()
            grad_query, grad_key, grad_value = _own_grads(
                grad_output, query, own_key, own_value, output, lse, ctx.own_state, ctx.scale, ctx.kernel
            )
            if past.length > past.first:
                grad_query = grad_query.to(lse.dtype)
                _stream_past_grads(ctx, past, grad_output, query, output, lse, grad_query)
        return grad_query.to(query.dtype), grad_key, grad_value, None, None, None


# ----- elsewhere: plain tensor ops over key blocks ---------------------------------------------------------

# Scores are computed for one block of keys at a time: `B·H·c × block` elements. Few, large blocks keep
# the number of kernel launches down on a GPU; the bound keeps the block's scores to 128 MiB in float32.
_BLOCK_ELEMENTS = 1 << 25
_MIN_BLOCK = 128


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; asynchronous from pinned host memory."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


def _key_block(query: torch.Tensor) -> int:
    batch, heads, chunk, _ = query.shape
    return max(_MIN_BLOCK, _BLOCK_ELEMENTS // (batch * heads * chunk))


def _block_scores(queries: torch.Tensor, keys: torch.Tensor, start: int, past: int, groups: int, dtype) -> torch.Tensor:
    """Scores of all (grouped) queries against keys `[start, start + n)`, causally masked.

    Args:
        queries: `[B, H_kv, G·c, D]`, already scaled; row `g·c + t` is query `t` of head `g` of the group.
        keys: `[B, H_kv, n, D]`.
        past: the number of keys before the chunk; query `t` sees keys `0 .. past + t`.
        dtype: of the scores; at least float32, so that half-precision scores are not rounded before
            the softmax (as in flash attention).
    Returns:
        `[B, H_kv, G·c, n]`, -inf where the key is in the query's future.
    """
    scores = queries.to(dtype) @ keys.to(dtype).transpose(-1, -2)
    count = keys.shape[-2]
    if start + count - 1 > past:  # the block reaches into the chunk itself: hide each query's future
        batch, kv_heads, rows, _ = scores.shape
        chunk = rows // groups
        query_position = torch.arange(past, past + chunk, device=scores.device)[:, None]
        key_position = torch.arange(start, start + count, device=scores.device)[None, :]
        scores.view(batch, kv_heads, groups, chunk, count).masked_fill_(key_position > query_position, float("-inf"))
    return scores


class _BlockedAttention(torch.autograd.Function):
    """The same function as `_SplitAttention`, from plain tensor ops: an online softmax over key blocks.

    Keys and values may live on another device than the queries (an offloaded `ChunkCache`): each block
    is copied to the queries' device when it is used, and its gradient is written back where it lives.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, block: int):
        # query [B, H, c, D]; key [B, H_kv, S, D]; value [B, H_kv, S, Dv]; S >= c.
        batch, heads, chunk, _ = query.shape
        kv_heads, length = key.shape[1], key.shape[2]
        groups, past = heads // kv_heads, length - chunk
        accumulate = torch.promote_types(query.dtype, torch.float32)  # softmax statistics in >= float32
        queries = _as_rows(query * scale, kv_heads)
        rows = (batch, kv_heads, groups * chunk, 1)
        output = query.new_zeros(*rows[:3], value.shape[-1], dtype=accumulate)
        row_max = query.new_full(rows, float("-inf"), dtype=accumulate)
        row_sum = query.new_zeros(rows, dtype=accumulate)
        device = query.device
        for start in range(0, length, block):
            # Key 0 is in the first block and visible to every query, so row_max is finite from then on.
            keys, values = (_on(t[:, :, start : start + block], device) for t in (key, value))
            probs = _block_scores(queries, keys, start, past, groups, accumulate)
            new_max = torch.maximum(row_max, probs.amax(-1, keepdim=True))
            probs.sub_(new_max).exp_()
            rescale = torch.exp(row_max - new_max)
            row_sum = row_sum * rescale + probs.sum(-1, keepdim=True)
            output = output * rescale + (probs.to(value.dtype) @ values).to(accumulate)
            row_max = new_max
        output = output / row_sum
        log_sum_exp = row_max + torch.log(row_sum)
        ctx.save_for_backward(queries, key, value, output, log_sum_exp)
        ctx.scale, ctx.block, ctx.groups = scale, block, groups
        return output.to(query.dtype).view(batch, heads, chunk, value.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):  # the caller's autocast is active here
            return _BlockedAttention._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        queries, key, value, output, log_sum_exp = ctx.saved_tensors
        need_query, need_key, need_value = ctx.needs_input_grad[:3]
        past = key.shape[2] - queries.shape[2] // ctx.groups
        accumulate = output.dtype
        grad_rows = grad_output.reshape(output.shape).to(queries.dtype)
        delta = (grad_rows.to(accumulate) * output).sum(-1, keepdim=True)  # rowsum(dO ∘ O), [B, H_kv, G·c, 1]
        grad_queries = torch.zeros_like(queries, dtype=accumulate) if need_query else None
        grad_key = torch.empty_like(key) if need_key else None
        grad_value = torch.empty_like(value) if need_value else None
        for start in range(0, key.shape[2], ctx.block):
            end = min(start + ctx.block, key.shape[2])
            keys, values = _on(key[:, :, start:end], queries.device), _on(value[:, :, start:end], queries.device)
            probs = _block_scores(queries, keys, start, past, ctx.groups, accumulate).sub_(log_sum_exp).exp_()
            if need_value:  # the G query heads of a group sum into their shared KV head through the row axis
                grad_value[:, :, start:end] = probs.to(value.dtype).transpose(-1, -2) @ grad_rows
            grad_scores = (grad_rows @ values.transpose(-1, -2)).to(accumulate).sub_(delta).mul_(probs).to(queries.dtype)
            if need_query:
                grad_queries += (grad_scores @ keys).to(accumulate)
            if need_key:
                grad_key[:, :, start:end] = grad_scores.transpose(-1, -2) @ queries
        grad_query = None
        if need_query:
            batch, kv_heads, rows, dim = queries.shape
            grad_query = (grad_queries * ctx.scale).to(queries.dtype).view(batch, kv_heads * ctx.groups, rows // ctx.groups, dim)
        return grad_query, grad_key, grad_value, None, None


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """`causal_chunk_attention` on plain tensor ops (`_BlockedAttention`, keys in blocks sized for the query):
    the last resort where no fused kernel passed its check. Shapes as `causal_chunk_attention`'s, one dtype."""
    return _BlockedAttention.apply(query, key, value, scale, _key_block(query))


def causal_chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, offloaded: OffloadedPast | None = None
) -> torch.Tensor:
    """Causal attention of the last `c` positions of a sequence over all `S` of its keys.

    Query `t` sits at key position `S - c + t` and sees keys `0 .. S - c + t`. Runs on the fused kernel
    `chunkwise.kernels.select_kernel` picks for the device, dtype and head dim (checked on first use),
    else on `_BlockedAttention`.

    Args:
        query: `[B, H, c, D]`.
        key: `[B, H_kv, S, D]` with `H` a multiple of `H_kv` (grouped-query attention) and `S >= c`.
        value: `[B, H_kv, S, Dv]`.
        scale: multiplies q·kᵀ (usually `D ** -0.5`).
        offloaded: the host-resident past `key`/`value` stand for (an offloaded `ChunkCache`); with a fused
            kernel it streams to the device block by block, overlapped with compute.
    Returns:
        `[B, H, c, Dv]`.
    """
    kernel = None
    if offloaded is not None or key.device == query.device:
        kernel = select_kernel(query.device, query.dtype, query.shape[-1], run=split_attention)
    if kernel is None:
        return blocked_attention(query, key.to(query.dtype), value.to(query.dtype), scale)
    if offloaded is not None:
        own_key, own_value = (t.to(query.dtype) for t in (offloaded.fresh_keys, offloaded.fresh_values))
        return _OffloadedSplitAttention.apply(query, own_key, own_value, scale, kernel, offloaded)
    return _SplitAttention.apply(query, key, value, scale, kernel)


# ----- the transformers attention function --------------------------------------------------------------

# Options that change what attention computes. A sliding window is not among them: the mask check
# below sees it (a window shorter than the keys makes the mask non-causal, and SDPA ignores the option).
_SEMANTIC_OPTIONS = ("softcap", "s_aux", "sinks", "position_bias")


class _MaskVerdicts:
    """Remembers whether the last mask seen is plain causal; transformers passes one mask to every layer."""

    def __init__(self):
        self._mask = lambda: None
        self._version = -1
        self._plain = False

    def is_plain_causal(self, mask: torch.Tensor, chunk: int) -> bool:
        if self._mask() is mask and mask._version == self._version:
            return self._plain
        self._mask, self._version = weakref.ref(mask), mask._version
        self._plain = _is_plain_causal(mask, chunk)
        return self._plain


def _is_plain_causal(mask: torch.Tensor, chunk: int) -> bool:
    """True if the boolean `[B, 1, c, S]` mask lets query t see exactly keys `0 .. S - c + t`."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != chunk:
        return False
    past = mask.shape[3] - chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=mask.device).tril()
    return bool(mask[..., :past].all()) and bool((mask[..., past:] == causal).all())


_verdicts = _MaskVerdicts()


def _takes(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Is this call the case `causal_chunk_attention` computes exactly?"""
    if dropout or not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return False
    if any(kwargs.get(option) is not None for option in _SEMANTIC_OPTIONS):
        return False
    chunk, length = query.shape[2], key.shape[2]
    if query.shape[1] % key.shape[1] or length < chunk or not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return False
    if attention_mask is None:  # transformers leaves the mask out only when it is plain causal over equal lengths
        return chunk == length
    segments = segments_of(attention_mask)  # a packed row's per-document mask the engine built
    if segments is not None:
        return segments.past == length - chunk and len(segments.rows) == query.shape[0]
    return isinstance(attention_mask, torch.Tensor) and _verdicts.is_plain_causal(attention_mask, chunk)


def _streams(segments: DocumentSegments) -> bool:
    """Can an offloaded past stream for these runs? One row, whose only run into the past starts at its first key
    (the engine narrows the past to it); otherwise the past is moved to the device for the call."""
    return len(segments.rows) == 1 and all(k0 == 0 or k0 >= segments.past for _, _, k0 in segments.rows[0])


def _per_document(query, key, value, scale: float, segments: DocumentSegments, offloaded: OffloadedPast | None) -> torch.Tensor:
    """`causal_chunk_attention` run per document (`chunkwise.attention.documents`); an offloaded past streams
    into the run that reads it, runs of documents starting in the chunk read the chunk's own keys."""
    past = segments.past

    def attend(q, k, v, row, k0):
        if offloaded is None:
            return causal_chunk_attention(q, k.to(q.dtype), v.to(q.dtype), scale)
        # Offloaded: `k`, `v` are host views; the run's own keys are taken from the chunk's fresh ones on the device.
        length = k.shape[2]
        own = slice(k0 - past, k0 - past + length) if k0 >= past else slice(0, length - past)
        own_key, own_value = (t[row : row + 1, :, own].to(q.dtype) for t in (offloaded.fresh_keys, offloaded.fresh_values))
        if k0 >= past:  # a document that starts in the chunk: its own keys only
            return causal_chunk_attention(q, own_key, own_value, scale)
        return causal_chunk_attention(q, k, v, scale, offloaded=replace(offloaded, fresh_keys=own_key, fresh_values=own_value))

    return document_attention(query, key, value, segments, attend)


def chunk_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: `causal_chunk_attention` where it applies, else SDPA.

    Shapes as in transformers: query `[B, H, c, D]`, key/value `[B, H_kv, S, D]`; returns the output
    as `[B, c, H, D]` and no attention weights.
    """
    if not _takes(module, query, key, value, attention_mask, dropout, kwargs):
        # An offloaded past is moved to the device whole for SDPA (exact, but no memory saved on this layer).
        key, value = key.to(query.device), value.to(query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # The dtype SDPA would compute in: under autocast the autocast dtype (the `ChunkCache` stores K/V in
    # it already, so the past is not copied; only the chunk's float32 queries are cast), else the widest
    # input dtype. Autocast is turned off inside: the kernels take care of their own precision.
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    offloaded = claim(key, value)  # a host-resident past the cache handed over with these tensors
    segments = segments_of(attention_mask)
    if segments is not None and offloaded is not None and not _streams(segments):
        key, value, offloaded = key.to(query.device), value.to(query.device), None  # exact, no memory saved here
    with torch.autocast(device_type, enabled=False):
        if segments is not None:
            output = _per_document(query.to(dtype), key if offloaded is not None else key.to(dtype), value if offloaded is not None else value.to(dtype),
                                   scale, segments, offloaded)
        elif offloaded is not None:
            output = causal_chunk_attention(query.to(dtype), key, value, scale, offloaded=offloaded)
        else:
            output = causal_chunk_attention(query.to(dtype), key.to(dtype), value.to(dtype), scale)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, chunk_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # same boolean masks as "sdpa"


@contextlib.contextmanager
def chunk_attention(config, enabled: bool = True):
    """Within the block, a model whose `config` uses "sdpa" attention uses `chunk_attention_forward`.

    Other attention implementations (eager, flash attention, flex) are left as they are: they either
    need their own mask format or already avoid the copies this one removes. The setting is restored
    on exit, also on error.
    """
    original = getattr(config, "_attn_implementation", None)
    if not enabled or original != "sdpa":
        yield
        return
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = original
