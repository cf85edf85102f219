"""The arithmetic of a training step from shapes alone: how much of it is attention, for a plain row or a packed one.

    flops = step_flops(shape, "seco", seq_len=32768, chunk_size=1024, documents=(4096,) * 8)
    flops.attention_share       # attention's part of the step's FLOPs

A packed row (several documents, `position_ids` restarting at 0, `chunkwise train --packing documents`) is
given as its documents' lengths, in row order. Per-document attention reads, for each query, only the keys
of its own document: a document of L tokens has L(L+1)/2 query-key pairs, so the row has the sum of those
instead of T(T+1)/2 — 8 documents of 4K in a 32K row have 1/8 of the pairs. The projections, the MLP and
the LM head cost the same per token either way.

FLOPs are counted as multiply-adds times two: per token, 2 x (weights of the layers' linears) and 2 x
hidden x vocab for the LM head; per visible query-key pair and layer, 4 x heads x head_dim (the scores and
the weighted values). A backward costs twice its forward. Per method: full = 3 forwards; ckpt = 4 (the
layers' forward runs again); seco = stage 1 (a forward of the layers, no head) + stage 2 (forward and
backward: 3); spaco = stage 1 + budget/chunks of stage 2 (its other chunks run no backward). Kernels' real
speeds differ (attention is less efficient per FLOP than a matmul on a CPU), so the share is a guide, not a
measurement: docs/benchmarks.md compares it with step times.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from chunkwise.plan.shape import ModelShape, PlanError

# Forward-equivalent passes of each method's step, (layers, LM head) apart: stage 1 of seco/spaco runs no head.
_PASSES = {"full": (3, 3), "ckpt": (4, 3), "seco": (4, 3), "seco+offload": (4, 3)}


def check_documents(documents: tuple[int, ...] | None, seq_len: int) -> None:
    """PlanError unless `documents` (lengths, in row order) are integers >= 1 that add up to `seq_len`."""
    if documents is None:
        return
    if not documents or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in documents):
        raise PlanError(f"document lengths must be positive integers, got {list(documents)}")
    if sum(documents) != seq_len:
        raise PlanError(f"the documents' lengths add up to {sum(documents)} tokens, not the row's {seq_len}; "
                        "give lengths that fill the row (or leave out the row length: it is their sum)")


def document_starts(documents: tuple[int, ...]) -> list[int]:
    """Where each document begins in the row: `[0, L0, L0 + L1, ...]`."""
    return [0, *itertools.accumulate(documents)][:-1]


def first_visible_key(documents: tuple[int, ...] | None, position: int) -> int:
    """The first key the query at `position` may read: its document's start (0 in a plain row).

    The engine reads, for a chunk, the keys from the first visible key of its first query on
    (`chunkwise.core.documents.Documents.first_key`): what the chunk's activations keep is sized by those keys.
    """
    if documents is None:
        return 0
    return max(start for start in document_starts(documents) if start <= position)


def attention_pairs(seq_len: int, documents: tuple[int, ...] | None = None) -> int:
    """Visible (query, key) pairs of causal attention over the row: each document's L(L+1)/2, or T(T+1)/2 for one stream."""
    return sum(n * (n + 1) // 2 for n in (documents or (seq_len,)))


@dataclass(frozen=True)
class StepFlops:
    """One step's FLOPs (one row), by where they go.

    Attributes:
        method: the planner's method name.
        linear: the layers' projections and MLP, and the LM head.
        attention: scores and weighted values over the visible query-key pairs.
    """

    method: str
    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention

    @property
    def attention_share(self) -> float:
        return self.attention / self.total


def step_flops(shape: ModelShape, method: str, *, seq_len: int, chunk_size: int | None = None, budget: int | None = None,
               documents: tuple[int, ...] | None = None) -> StepFlops:
    """The FLOPs of one step of `method` on one row of `seq_len` tokens (packed: `documents`), see the module docstring.

    `chunk_size` and `budget` matter only to spaco (the share of chunks stage 2 backpropagates).
    """
    check_documents(documents, seq_len)
    layer_weights = sum(i * o for name, i, o in shape.linears if not name.endswith("lm_head"))
    head_weights = shape.hidden * shape.vocab
    layer_forward = 2 * layer_weights * seq_len
    head_forward = 2 * head_weights * seq_len
    attention_forward = 4 * shape.heads * shape.head_dim * shape.layers * attention_pairs(seq_len, documents)
    if method == "spaco":
        if not chunk_size or not budget:
            raise PlanError("spaco's FLOPs need its chunk size and budget")
        kept = min(1.0, budget / -(-seq_len // chunk_size))
        layers, head = 1 + 3 * kept, 1 + 2 * kept  # stage 1 runs no head; every chunk reports its loss (full_loss)
    elif method in _PASSES:
        layers, head = _PASSES[method]
    else:
        raise PlanError(f"unknown method {method!r}; choose from full, ckpt, seco, spaco, seco+offload")
    return StepFlops(method, layers * layer_forward + head * head_forward, layers * attention_forward)
