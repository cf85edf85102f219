"""Checking a training batch and cutting it into chunks, before any model work is done.

Every problem with the caller's tensors is reported here as a `ValueError`/`TypeError` that names the
argument and the fix, instead of surfacing later as a shape error deep inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkwise.core.documents import Documents, find_documents
from chunkwise.core.loss import IGNORE_INDEX, shift_labels


@dataclass(frozen=True)
class ChunkedBatch:
    """A validated batch, on the model's device, with its chunk boundaries.

    Attributes:
        input_ids: `[B, T]` token ids, or None when the caller gave embeddings.
        inputs_embeds: `[B, T, H]` input embeddings as a detached leaf (requires grad when the caller's
            did, so each chunk's gradient accumulates in its `.grad`), or None when given token ids.
        targets: `[B, T]` next-token targets (labels shifted once over the whole sequence).
        attention_mask: `[B, T]` 1 for real tokens, 0 for right padding; None when there is no padding.
        normaliser: what the summed token loss is divided by: `num_items` if the caller gave it, else the
            number of valid targets in the batch.
        num_targets: number of valid (non -100) targets in the batch.
        bounds: `[(start, end), ...]` token ranges of the chunks; the last one may be shorter.
        chunk_has_targets: for each chunk, whether any of its targets is valid.
        position_ids: the caller's `[B, T]` positions (`[3 or 4, B, T]` for M-RoPE), or None: `0..T-1` in every row.
        documents: a packed batch's document layout (`chunkwise.core.documents`), or None: one document per row.
        first_keys: for each chunk, the first key any of its queries may read (0 without documents).
    """

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    normaliser: float
    num_targets: int
    bounds: list[tuple[int, int]]
    chunk_has_targets: list[bool]
    position_ids: torch.Tensor | None = None
    documents: Documents | None = None
    first_keys: tuple[int, ...] = ()

    def first_key(self, chunk: int) -> int:
        """The first key chunk `chunk` may read: keys before it belong to documents none of its queries is in."""
        return self.first_keys[chunk] if self.first_keys else 0

    def kv_is_read(self, chunk: int) -> bool:
        """Whether a later chunk reads `chunk`'s keys/values (first keys never decrease along a row: the next
        chunk's says it)."""
        return chunk + 1 < self.num_chunks and self.first_key(chunk + 1) < self.bounds[chunk][1]

    @property
    def num_chunks(self) -> int:
        return len(self.bounds)


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (tokens per chunk), got {chunk_size!r}")
    return chunk_size


def _check_token_tensor(name: str, tensor, like: torch.Tensor | None = None, like_name: str = "input_ids") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch, seq_len], got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integers (torch.long), got dtype {tensor.dtype}")
    if like is None and tensor.dim() != 2:
        hint = " (add a batch dimension: input_ids.unsqueeze(0))" if tensor.dim() == 1 else ""
        raise ValueError(f"{name} must be 2-D [batch, seq_len], got shape {tuple(tensor.shape)}{hint}")
    if like is not None and tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(tensor.shape)}")


def _check_right_padded(mask: torch.Tensor, packed: bool = False) -> None:
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
    if (mask[:, 1:] > mask[:, :-1]).any():
        if packed:
            raise ValueError(
                "attention_mask has padding before real tokens (left padding, or holes) in a packed batch (position_ids "
                "given): documents are told apart by position_ids restarting at 0, so drop the attention_mask, or pad "
                "only at the end of each row"
            )
        raise ValueError(
            "attention_mask has padding before real tokens (left padding, or holes); chunkwise supports right "
            "padding only: pad at the end of each row (tokenizer.padding_side = 'right')"
        )
    if (mask[:, 0] == 0).any():
        raise ValueError("attention_mask has a row with no real token; drop empty rows from the batch")


def mask_document_ends(targets: torch.Tensor, documents: Documents | None) -> torch.Tensor:
    """`targets` `[B, T]` with each document's last token predicting nothing (its next token starts another document)."""
    if documents is None:
        return targets
    return torch.cat([targets[:, :-1].masked_fill(documents.is_start[:, 1:], IGNORE_INDEX), targets[:, -1:]], dim=1)


def default_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels when the caller gives none: the inputs `[B, T]`, with padded positions (mask 0) set to -100."""
    return input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def _check_embeddings(inputs_embeds, hidden_size: int) -> None:
    if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
        raise TypeError("inputs_embeds must be a floating-point torch.Tensor of shape [batch, seq_len, hidden]")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"inputs_embeds must be [batch, seq_len, {hidden_size}] (the model's embedding size), "
            f"got shape {tuple(inputs_embeds.shape)}"
        )


def chunk_batch(
    input_ids=None,
    *,
    inputs_embeds=None,
    labels=None,
    attention_mask=None,
    num_items=None,
    position_ids=None,
    chunk_size: int,
    vocab_size: int,
    hidden_size: int,
    device: torch.device,
    max_positions: int | None = None,
) -> ChunkedBatch:
    """Validate the caller's tensors and prepare them for chunk-wise training.

    Exactly one of `input_ids` `[B, T]` and `inputs_embeds` `[B, T, H]` is given. `labels` default to
    `input_ids`, with padded positions (attention_mask 0) set to -100 so padding is never a target;
    with `inputs_embeds` labels are required. Given labels are used as they are (-100 = ignore).

    `position_ids` `[B, T]` (`[3 or 4, B, T]` M-RoPE) are passed to the model as given; where they restart at 0 a
    new document begins (`chunkwise.core.documents`), and whatever the labels say, the last token of a
    document predicts nothing. `max_positions`: the model's `max_position_embeddings`, if it has one.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds" + (" (both were given)" if input_ids is not None else ""))
    if inputs_embeds is not None:
        _check_embeddings(inputs_embeds, hidden_size)
        if labels is None:
            raise ValueError("labels are required with inputs_embeds: there are no token ids to predict")
        # A leaf of our own: every chunk's backward adds into its .grad, and the caller's graph (the
        # module that produced the embeddings) is walked once, at the end, not once per chunk.
        inputs_embeds = inputs_embeds.to(device).detach().requires_grad_(inputs_embeds.requires_grad)
        shape_like, input_name = inputs_embeds[..., 0], "inputs_embeds"
    else:
        _check_token_tensor("input_ids", input_ids)
        shape_like, input_name = input_ids, "input_ids"
    batch_size, seq_len = shape_like.shape
    if batch_size == 0 or seq_len == 0:
        raise ValueError(f"{input_name} is empty (shape {tuple(shape_like.shape)}); give at least one token per row")
    if input_ids is not None:
        lowest, highest = int(input_ids.min()), int(input_ids.max())
        if lowest < 0 or highest >= vocab_size:
            bad = lowest if lowest < 0 else highest
            raise ValueError(
                f"input_ids contains token id {bad}, outside the model's vocabulary [0, {vocab_size}); "
                "was the data tokenised with this model's tokenizer?"
            )
        input_ids = input_ids.to(device)

    if attention_mask is not None:
        _check_token_tensor("attention_mask", attention_mask, like=shape_like, like_name=input_name)
        attention_mask = attention_mask.to(device)
        _check_right_padded(attention_mask, packed=position_ids is not None)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: let the model use its plain causal mask
    documents = None
    if position_ids is not None:
        documents = find_documents(position_ids, shape=shape_like.shape, attention_mask=attention_mask, max_positions=max_positions)
        position_ids = position_ids.to(device=device, dtype=torch.long)
        documents = None if documents is None else Documents(documents.starts.to(device), documents.is_start.to(device))

    if labels is None:
        labels = default_labels(input_ids, attention_mask)
    else:
        _check_token_tensor("labels", labels, like=shape_like, like_name=input_name)
        labels = labels.to(device)
        out_of_range = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if out_of_range.any():
            raise ValueError(
                f"labels contains {int(labels[out_of_range][0])}: labels must be token ids in [0, {vocab_size}) "
                f"or {IGNORE_INDEX} (ignored)"
            )
    targets = mask_document_ends(shift_labels(labels), documents)
    valid = targets != IGNORE_INDEX
    num_targets = int(valid.sum())

    if num_items is None:
        normaliser = float(max(num_targets, 1))
    else:
        # A plain float (a tensor is read once): the loss keeps the model's precision, not num_items' dtype.
        normaliser = float(num_items)
        if not normaliser > 0:
            raise ValueError(f"num_items must be a positive number of target tokens, got {num_items!r}")

    bounds = [(start, min(start + chunk_size, seq_len)) for start in range(0, seq_len, chunk_size)]
    position_has_target = valid.any(dim=0).cpu()  # one device sync, not one per chunk
    has_targets = [bool(position_has_target[s:e].any()) for s, e in bounds]
    first_keys = () if documents is None else tuple(documents.first_key(s, e) for s, e in bounds)
    return ChunkedBatch(input_ids, inputs_embeds, targets, attention_mask, normaliser, num_targets, bounds, has_targets,
                        position_ids, documents, first_keys)
