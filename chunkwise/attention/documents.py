"""Per-document attention of a chunk of a packed row, from the same fused kernels, without a mask.

In a packed row (several documents, `chunkwise.core.documents`) query t of a chunk sees the keys from its
document's start to itself. Along the chunk the queries fall into runs of one document each; a run is
exactly the case `causal_chunk_attention` computes — queries at the end of their keys, every earlier key
visible — over the keys from its document's start to its last query. So a chunk's attention is one
`causal_chunk_attention` call per run (per row): the first run of a row reads the past from its document's
start, a run of a document that starts inside the chunk reads only its own keys. Foreign keys are never
touched, so no mask is needed and the kernels keep their fast path.

The engine builds the chunk's boolean mask (for the model's own attention) and registers with it the runs
(`register_segments`); `chunkwise.attention.chunk` looks a mask up here and, when it finds runs, calls
`document_attention` instead of SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The attribute a registered mask carries its runs in: it lives and dies with the mask, and a mask transformers
# derives from it (another tensor) does not carry it.
_ATTRIBUTE = "_chunkwise_document_segments"


@dataclass(frozen=True)
class DocumentSegments:
    """The runs of one chunk's queries, per row.

    Attributes:
        past: keys before the chunk's first query in the key tensor (`S - c`).
        rows: per row, `(q0, q1, k0)` triples: queries `[q0, q1)` of the chunk (one document) read keys
            `[k0, past + q1)` of the key tensor; runs cover `[0, c)` in order.
    """

    past: int
    rows: tuple[tuple[tuple[int, int, int], ...], ...]


def register_segments(mask: torch.Tensor, segments: DocumentSegments) -> None:
    """Remember that `mask` `[B, 1, c, S]` is the per-document causal mask whose runs are `segments`."""
    setattr(mask, _ATTRIBUTE, segments)


def segments_of(mask) -> DocumentSegments | None:
    """The runs registered with `mask`, or None (a mask the engine did not build for documents)."""
    return getattr(mask, _ATTRIBUTE, None) if isinstance(mask, torch.Tensor) else None


def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: DocumentSegments,
                       attend: Callable) -> torch.Tensor:
    """Per-document causal attention of a chunk, one `attend` call per run.

    Args:
        query: `[B, H, c, D]`; key `[B, H_kv, S, D]`, value `[B, H_kv, S, Dv]`, `S - c == segments.past`.
        attend: `causal_chunk_attention`-like `(query [1, H, n, D], key [1, H_kv, m, D], value, row, k0) ->
            [1, H, n, Dv]` for queries at the end of their `m >= n` keys; `row` and `k0` say which row and
            first key the call reads (the offloaded path streams that part of the past itself).
    Returns:
        `[B, H, c, Dv]`.
    """
    past = segments.past
    rows = []
    # Slices' backward allocates a zero gradient of the whole sliced tensor; splits' backward one for all pieces.
    # So each row's tensors are split, its first run's keys sliced, the other runs' (the chunk's own keys after
    # the first run) split: two key-sized gradients per row, whatever the number of documents.
    for row, (q, k, v) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        (_, first_end, first_key), *others = segments.rows[row]
        parts = [attend(q[:, :, :first_end], k[:, :, first_key : past + first_end], v[:, :, first_key : past + first_end], row, first_key)]
        if others:
            sizes = [q1 - q0 for q0, q1, _ in others]
            pieces = zip(q[:, :, first_end:].split(sizes, dim=2), k[:, :, past + first_end :].split(sizes, dim=2),
                         v[:, :, past + first_end :].split(sizes, dim=2), others)
            parts += [attend(q_run, k_run, v_run, row, k0) for q_run, k_run, v_run, (_, _, k0) in pieces]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
