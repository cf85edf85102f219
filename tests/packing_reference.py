"""Packed rows for the tests, and their reference: each document trained alone with full backprop.

A packed row holds several documents one after another, `position_ids` restarting at 0 at each (the layout
of transformers' `DataCollatorWithFlattening`). Its reference gradient (`per_document_backward`) runs every
document alone through one ordinary forward with positions 0..n-1, sums the token losses of all documents
of all rows and divides once by the batch's number of targets: what chunk-wise training of the packed rows
must equal.
"""

from __future__ import annotations

import torch
from reference import trainable_grads

from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels

VOCAB = 128  # the tiny presets' vocabulary


def packed_rows(layouts: list[list[int]], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of documents of the given lengths (each row's lengths sum to the same T): `(input_ids, position_ids)`, `[B, T]`."""
    totals = {sum(lengths) for lengths in layouts}
    assert len(totals) == 1, f"rows of different lengths {totals}"
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(layouts), totals.pop()), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in layouts])
    return ids, positions


def collator_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Labels as `DataCollatorWithFlattening` makes them: the inputs, with each document's first token -100."""
    return input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)


def documents_of(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the `(start, end)` token ranges of its documents."""
    spans = []
    for row in position_ids:
        starts = [i for i in range(len(row)) if i == 0 or int(row[i]) == 0]
        spans.append(list(zip(starts, [*starts[1:], len(row)])))
    return spans


def per_document_backward(model, input_ids, position_ids, *, labels=None, num_items=None, model_position_ids=None):
    """Each document alone through one full forward, token losses summed, one global normaliser; one backward.

    Returns (loss, grads), gradients zeroed first. `labels` default to `input_ids`. `model_position_ids`: M-RoPE
    positions `[3, B, T]` to give the model (each document gets its slice); default: none (0..n-1)."""
    model.zero_grad(set_to_none=True)
    labels = input_ids if labels is None else labels
    pieces = []
    for row, spans in enumerate(documents_of(position_ids)):
        for start, end in spans:
            extra = {} if model_position_ids is None else {"position_ids": model_position_ids[:, row : row + 1, start:end]}
            pieces.append(({"input_ids": input_ids[row : row + 1, start:end], **extra}, shift_labels(labels[row : row + 1, start:end])))
    count = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in pieces)
    normaliser = num_items if num_items is not None else count
    total = sum(chunk_loss_sum(model(**inputs).logits, targets) for inputs, targets in pieces) / normaliser
    total.backward()
    return total.detach(), trainable_grads(model)
