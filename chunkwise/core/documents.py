"""Packed rows: several documents in one row, told apart by `position_ids` that restart at 0 (DESIGN.md §2).

The convention is transformers' (`DataCollatorWithFlattening`, TRL's `padding_free`): within a row, a token
whose position does not continue the previous one by +1 begins a new document, and that position must be 0
(the first token of a row may hold any position: a row may begin inside a document). Each document is
trained as if it were alone: it attends causally to its own tokens only (a sliding window acts inside it),
its positions are the given ones, and its last token predicts nothing (the next token belongs to another
document).

`find_documents` checks the caller's `position_ids` and finds each token's document start; `Documents`
then answers what the engine asks per chunk: the first key any query of the chunk may read (earlier chunks
are neither read nor relayed into) and the attention mask the model gets for the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkwise.attention.documents import DocumentSegments, register_segments

# Attention implementations whose masks the engine can build: boolean (SDPA and chunkwise's own) or additive.
_BOOLEAN_MASKS = ("sdpa", "chunkwise_sdpa")
_ADDITIVE_MASKS = ("eager",)


@dataclass(frozen=True)
class Documents:
    """The document layout of a packed batch.

    Attributes:
        starts: `[B, T]` long, the index of the first token of each token's document.
        is_start: `[B, T]` bool, True where a document begins (token 0 of every row included).
    """

    starts: torch.Tensor
    is_start: torch.Tensor

    def first_key(self, start: int, end: int) -> int:
        """The first key any query in `[start, end)` may read, over all rows: keys before it are foreign to the chunk."""
        return int(self.starts[:, start:end].min())

    def chunk_mask(self, start: int, end: int, first: int, *, window: int | None, implementation: str) -> torch.Tensor:
        """The attention mask of chunk `[start, end)` over keys `[first, end)`, `[B, 1, end - start, end - first]`.

        Query q sees key k iff `starts[q] <= k <= q` (and `q - k < window` for a sliding window). Boolean
        (True = attend) for SDPA, additive (0 / dtype minimum) for eager attention; a mask without window
        is registered with chunkwise's attention (`chunkwise.attention.documents`), which then computes it
        per document without a mask.
        """
        queries = torch.arange(start, end, device=self.starts.device)[:, None]
        keys = torch.arange(first, end, device=self.starts.device)[None, :]
        visible = (keys <= queries) & (keys >= self.starts[:, start:end, None])  # [B, c, S]
        if window is not None:
            visible &= queries - keys < window
        mask = visible[:, None]
        if implementation in _ADDITIVE_MASKS:
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        if window is None or window >= end - first:  # the window cuts nothing: chunkwise attention may take it
            register_segments(mask, self._segments(start, end, first))
        return mask

    def _segments(self, start: int, end: int, first: int) -> DocumentSegments:
        """Per row, the chunk's queries grouped by document: `(q0, q1, k0)`, queries `[q0, q1)` of the chunk read
        keys from `k0` on (indices relative to the chunk and to the keys `[first, end)`)."""
        rows = []
        is_start = self.is_start[:, start:end].cpu()
        starts = self.starts[:, start:end].cpu()
        for row in range(is_start.shape[0]):
            cuts = [0, *(int(i) for i in is_start[row, 1:].nonzero().flatten() + 1), end - start]
            rows.append(tuple((q0, q1, int(starts[row, q0]) - first) for q0, q1 in zip(cuts, cuts[1:])))
        return DocumentSegments(past=start - first, rows=tuple(rows))

    def model_mask(self, config, start: int, end: int, first: int):
        """What the model gets as `attention_mask` for chunk `[start, end)` over keys `[first, end)`: one mask,
        or `{layer type: mask}` for a model whose layers differ (sliding and full attention)."""
        implementation = getattr(config, "_attn_implementation", None)
        check_mask_support(implementation)
        window = getattr(config, "sliding_window", None)
        layer_types = set(getattr(config, "layer_types", None) or ())
        if len(layer_types) > 1:  # e.g. Gemma 3, Qwen2 with some sliding layers: they take a mask per layer type
            return {kind: self.chunk_mask(start, end, first, window=window if kind == "sliding_attention" else None,
                                          implementation=implementation) for kind in layer_types}
        if layer_types and layer_types != {"sliding_attention"}:
            window = None
        return self.chunk_mask(start, end, first, window=window, implementation=implementation)


def check_mask_support(implementation: str | None) -> None:
    if implementation not in _BOOLEAN_MASKS + _ADDITIVE_MASKS:
        raise ValueError(
            f"per-document attention (position_ids that restart at 0) needs a model using 'sdpa' or 'eager' "
            f"attention; this one uses {implementation!r}: load it with attn_implementation='sdpa'"
        )


def _check_position_tensor(position_ids, shape: torch.Size) -> torch.Tensor:
    """The positions `[B, T]` documents are found from: `position_ids` `[B, T]` itself; for M-RoPE (Qwen2-VL,
    Qwen2.5-VL) `[3, B, T]` (temporal, height, width) its temporal row, which on text tokens is the text position;
    `[4, B, T]` (transformers' packed layout: text positions, then the three M-RoPE rows) its text row."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor of shape [batch, seq_len], got {type(position_ids).__name__}")
    if position_ids.dtype == torch.bool or position_ids.is_floating_point() or position_ids.is_complex():
        raise TypeError(f"position_ids must hold integers (torch.long), got dtype {position_ids.dtype}")
    if tuple(position_ids.shape) == tuple(shape):
        return position_ids
    if position_ids.dim() == 3 and position_ids.shape[0] in (3, 4) and tuple(position_ids.shape[1:]) == tuple(shape):
        return position_ids[0]
    raise ValueError(
        f"position_ids must have the shape of input_ids {tuple(shape)} (or [3 or 4, *that] for M-RoPE), got {tuple(position_ids.shape)}"
    )


def find_documents(position_ids, *, shape: torch.Size, attention_mask: torch.Tensor | None, max_positions: int | None) -> Documents | None:
    """Check the caller's `position_ids` and find the documents of each row; None if every row is one document.

    Args:
        position_ids: `[B, T]` integer positions (or `[3, B, T]` / `[4, B, T]` for M-RoPE, whose first row is checked).
        shape: `(B, T)` of the batch.
        attention_mask: `[B, T]` right padding (already checked), or None; padded tokens' positions are not read.
        max_positions: the model's `max_position_embeddings`, if it has one.
    """
    positions = _check_position_tensor(position_ids, shape).to(torch.long)
    real = torch.ones_like(positions, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lowest = int(positions[real].min())
    highest = int(positions[real].max())
    if lowest < 0:
        raise ValueError(f"position_ids contains {lowest}; positions are non-negative (each document starts at 0)")
    if max_positions is not None and highest >= max_positions:
        raise ValueError(
            f"position_ids contains {highest}, beyond the model's limit (max_position_embeddings = {max_positions}); "
            "split longer documents or use a model with a longer context"
        )
    steps = positions[:, 1:] - positions[:, :-1]
    restart = (steps != 1) & real[:, 1:]
    bad = restart & (positions[:, 1:] != 0)
    if bool(bad.any()):
        row, index = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"position_ids jump from {int(positions[row, index])} to {int(positions[row, index + 1])} (row {row}, token "
            f"{index + 1}): a position must continue the previous one (+1) or restart at 0 (a new document)"
        )
    if not bool(restart.any()):
        return None
    is_start = torch.cat([torch.ones_like(restart[:, :1]), restart], dim=1)
    index = torch.arange(shape[1], device=positions.device).expand_as(is_start)
    starts = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return Documents(starts=starts, is_start=is_start)
