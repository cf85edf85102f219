"""The token loss of one chunk, shifted and normalised over the whole batch (DESIGN.md §2).

Two conditions make the chunked loss equal the full-sequence one:

* Global label shift: the last token of chunk j predicts the first token of chunk j+1, so labels are
  shifted once over the whole sequence (`shift_labels`) and only then cut into chunks.
* Global normalisation: each chunk contributes the *sum* of its token losses divided by one
  normaliser for the whole batch (the number of valid targets, or the caller's `num_items`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the inputs: `targets[:, t] = labels[:, t + 1]`, and -100 at the last position.

    Args:
        labels: `[B, T]` labels aligned with `input_ids` (Hugging Face convention).
    Returns:
        `[B, T]` next-token targets.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> int:
    """Valid next-token targets in `labels` `[B, T]`: after the shift, not -100."""
    return int((shift_labels(labels) != IGNORE_INDEX).sum())


def chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the valid (non -100) targets of one chunk.

    Args:
        logits: `[B, c, V]` the model's logits for the chunk's tokens.
        targets: `[B, c]` next-token targets (from `shift_labels`), -100 where ignored.
    Returns:
        A scalar; 0 (still differentiable) when the chunk has no valid target.
    """
    # Half-precision logits are upcast, as transformers does for its own loss; float64 stays float64.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_logps(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next-token target under `softmax(logits / temperature)`, 0 where ignored.

    The per-token quantity of preference and RL objectives (`chunkwise.objectives`).

    Args:
        logits: `[B, c, V]` the model's logits for a chunk (half precision is upcast to float32).
        targets: `[B, c]` next-token targets (from `shift_labels`), -100 where ignored.
    Returns:
        `[B, c]` log-probabilities (differentiable where the logits are), exactly 0 at ignored targets.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    valid = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~valid, 0.0)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, *, num_items: float | None = None) -> torch.Tensor:
    """Ordinary (full-sequence) training loss: token cross-entropy summed, divided by `num_items` or the
    number of valid targets. What chunked training is compared with and what `--method full` trains.

    Args:
        logits: `[B, T, V]` the model's logits for the whole sequence.
        labels: `[B, T]` labels aligned with `input_ids` (shifted here), -100 where ignored.
    """
    targets = shift_labels(labels)
    normaliser = (targets != IGNORE_INDEX).sum() if num_items is None else num_items
    return chunk_loss_sum(logits, targets) / normaliser
