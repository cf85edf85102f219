"""Preference data: prompt / chosen / rejected examples → paired token rows for DPO-family objectives.

    read_preference_pairs  path  -> [PreferencePair]   (chosen and rejected rows of one prompt)
    collate_pairs          pairs -> {"input_ids", "attention_mask", "labels"} [2B, T]: B chosen rows, then B rejected

Each example is read twice through `data.load_records` (prompt + chosen, prompt + rejected), so the
file formats, field checks and one-line `DataError`s are those of instruction data: the prompt's tokens
are context only (label -100), the response's tokens and EOS are the targets. The batch layout is the
one `chunkwise.objectives.DPO` (and TRL) expect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.files import DataError, load_records
from chunkwise.data.sequences import Sequence, collate, tokenize_records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with its preferred (`chosen`) and dispreferred (`rejected`) response, as token rows."""

    chosen: Sequence
    rejected: Sequence


def _truncated(input_ids: list[int], labels: list[int], seq_len: int) -> Sequence | None:
    """The row's first `seq_len` tokens, or None when no target is left in them."""
    labels = labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Sequence(input_ids[:seq_len], labels)


def read_preference_pairs(
    path: str,
    tokenizer,
    *,
    seq_len: int,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
) -> list[PreferencePair]:
    """Preference pairs from a JSONL file (or any format `data.load_records` reads), each row cut to `seq_len`.

    A pair whose chosen or rejected row keeps no response token within `seq_len` (a prompt too long) is
    dropped with a logged warning.

    Raises:
        DataError: a missing or non-string field (naming the line), an empty response without an EOS token
            to predict, or no pair left.
    """
    sides = []
    for response_field in (chosen_field, rejected_field):
        records = load_records(path, prompt_field=prompt_field, response_field=response_field, split=split)
        sides.append(tokenize_records(records, tokenizer))
    pairs = []
    for chosen, rejected in zip(*sides):
        rows = [_truncated(document.input_ids, document.labels, seq_len) for document in (chosen, rejected)]
        if None not in rows:
            pairs.append(PreferencePair(*rows))
    if not pairs:
        raise DataError(
            f"none of the {len(sides[0])} preference examples in {path} keeps a response token within {seq_len} tokens; "
            "raise --seq-len or shorten the prompts"
        )
    if len(pairs) < len(sides[0]):
        logger.warning("dropped %d of %d preference pairs whose prompt fills seq_len=%d", len(sides[0]) - len(pairs), len(sides[0]), seq_len)
    return pairs


def collate_pairs(pairs: list[PreferencePair], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `[2B, T]` batch: the B chosen rows, then the B rejected rows in the same order."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return collate([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_token_id=pad_token_id)


def pair_batch(chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join two collated batches (`input_ids`, `attention_mask`, `labels`, each `[B, T_c]` / `[B, T_r]`) into the
    `[2B, T]` layout of `DPO`: chosen rows first, right padding (pad id 0 for input ids, -100 for labels).

    Raises:
        ValueError: if the two batches do not hold the same number of rows (they must pair up row by row).
    """
    if set(chosen) != set(rejected):
        raise ValueError(f"chosen and rejected batches hold different keys: {sorted(chosen)} vs {sorted(rejected)}")
    rows = {name: (chosen[name].shape[0], rejected[name].shape[0]) for name in chosen}
    if any(a != b for a, b in rows.values()):
        raise ValueError(
            f"chosen and rejected batches are not paired: {rows['input_ids'][0]} chosen rows vs {rows['input_ids'][1]} "
            "rejected rows; row b of each must answer the same prompt"
        )
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    padding = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    joined = {}
    for name, tensors in ((name, (chosen[name], rejected[name])) for name in chosen):
        value = padding.get(name, 0)
        joined[name] = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])
    return joined
