"""Held-out evaluation during training: which data, how it is scored, which step was best.

`chunkwise train` scores a held-out set every `--eval-every` steps (and at the start and the end):

* `--eval-data PATH`: any data `--data` takes (text, JSONL with a text or prompt/response fields,
  json/csv/parquet, a `save_to_disk` folder, a hub dataset), read with the training run's tokenizer,
  fields, `--seq-len` and `--packing`, so the held-out loss is measured on rows shaped like the training
  rows and is comparable with the training loss (packed rows, `--packing documents`, are scored with their
  `position_ids`: each document sees only itself, as in training);
* without it, on the synthetic task: 32 sequences of a generator stream training never reads.

Scoring is `chunkwise eval`'s: chunk by chunk through a KV cache without autograd
(`evaluate.score_batches`), so a held-out row as long as the training rows fits in the memory of one
chunk's activations plus its KV cache. Each evaluation becomes one `metrics.jsonl` record
(`kind: "eval"`) with its loss, perplexity, accuracy, and its cost: the tokens scored and the seconds
spent. The best evaluation is the one with the lowest held-out loss (the earliest on a tie); the run
directory names it in `best_eval.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkwise.core.handle import CausalLMHandle
from chunkwise.core.inference import score_batches
from chunkwise.data.sequences import collate, read_sequences
from chunkwise.data.synthetic import SYNTHETIC, RecallTask, held_out_batches
from chunkwise.utils.memory import peak_memory_bytes

SYNTHETIC_HELD_OUT_SEQUENCES = 32
"""Held-out sequences of the synthetic task scored at each evaluation."""


@dataclass(frozen=True)
class HeldOutSet:
    """Collated held-out batches and what to call them.

    Attributes:
        name: the `--eval-data` path, or "synthetic".
        batches: `{"input_ids", "attention_mask", "labels"}` dicts, each `[B, T]`.
        chance: the accuracy of guessing (the synthetic task's 1 / values), None for file data.
    """

    name: str
    batches: list[dict]
    chance: float | None = None

    @property
    def num_sequences(self) -> int:
        return sum(batch["input_ids"].shape[0] for batch in self.batches)


def synthetic_held_out(task: RecallTask, *, batch_size: int, seq_len: int, seed: int) -> HeldOutSet:
    """The synthetic task's held-out stream for training seed `seed` (see `data.held_out_seed`)."""
    batches = held_out_batches(task, num_sequences=SYNTHETIC_HELD_OUT_SEQUENCES, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return HeldOutSet(SYNTHETIC, batches, task.chance_accuracy)


def file_held_out(path: str, tokenizer, *, batch_size: int, seq_len: int, packing: str, pad_token_id: int,
                  text_field: str = "text", prompt_field: str | None = None, response_field: str | None = None,
                  split: str = "train", **read) -> HeldOutSet:
    """Held-out rows read from `path` as `--data` is read (same tokenizer, fields, seq_len and packing; `read`:
    `read_sequences`'s other options, e.g. messages_field, glob).

    Raises:
        DataError: as `read_sequences` does, naming the file and what is wrong with it.
    """
    rows = read_sequences(path, tokenizer, seq_len=seq_len, packing=packing, text_field=text_field,
                          prompt_field=prompt_field, response_field=response_field, split=split, **read)
    return rows_held_out(path, rows, batch_size=batch_size, pad_token_id=pad_token_id)


def rows_held_out(name: str, rows: list, *, batch_size: int, pad_token_id: int) -> HeldOutSet:
    """Held-out rows already read (`--eval-fraction`'s documents), collated into batches of `batch_size`."""
    batches = [collate(rows[i : i + batch_size], pad_token_id=pad_token_id) for i in range(0, len(rows), batch_size)]
    return HeldOutSet(name, batches)


def evaluate_held_out(handle: CausalLMHandle, held_out: HeldOutSet, *, step: int, chunk_size: int,
                      device: torch.device, autocast_dtype=None) -> dict:
    """Score `held_out` chunk by chunk in eval mode (then restore the mode); return its metrics record.

    The record: `kind` "eval", `step`, `loss` (mean nats per target token), `perplexity`, `accuracy`
    (argmax next-token accuracy; for the synthetic task, of the answers), `chance` (synthetic task),
    `sequences`, `tokens` and `targets` scored, `seconds` (wall time of this evaluation) and
    `peak_memory_bytes` (as the training records count it).
    """
    was_training = handle.lm.training
    handle.lm.eval()
    started = time.perf_counter()
    try:
        scores, tokens = score_batches(handle, held_out.batches, chunk_size=chunk_size, device=device, autocast_dtype=autocast_dtype)
    finally:
        handle.lm.train(was_training)
    seconds = time.perf_counter() - started
    record = {"kind": "eval", "step": step, "loss": scores.loss, "perplexity": scores.perplexity, "accuracy": scores.accuracy}
    if held_out.chance is not None:
        record["chance"] = held_out.chance
    record.update(sequences=held_out.num_sequences, tokens=tokens, targets=scores.num_targets, seconds=seconds,
                  peak_memory_bytes=peak_memory_bytes(device))
    return record


def best_evaluation(records: list[dict]) -> dict | None:
    """The eval record with the lowest loss (the earliest of equals), or None if there is none."""
    evaluations = [r for r in records if r.get("kind") == "eval" and r.get("loss") == r.get("loss")]  # NaN != NaN
    return min(evaluations, key=lambda r: (r["loss"], r["step"])) if evaluations else None


def write_best(path: Path, records: list[dict]) -> dict | None:
    """Write `best_evaluation(records)` to `path` as JSON (with the metric it was chosen by); return it."""
    best = best_evaluation(records)
    if best is not None:
        Path(path).write_text(json.dumps({"chosen_by": "lowest held-out loss", **best}, indent=1) + "\n")
    return best


def describe_evaluation(record: dict, best: dict | None) -> str:
    """One line for the log: `eval @ step 300: loss 0.3312 (perplexity 1.39), accuracy 90.6% (chance 3.1%); best ...`."""
    chance = f" (chance {record['chance']:.1%})" if "chance" in record else ""
    line = (f"eval @ step {record['step']}: loss {record['loss']:.4f} (perplexity {record['perplexity']:.3f}), "
            f"accuracy {record['accuracy']:.1%}{chance}; {record['tokens']:,} tokens in {record['seconds']:.1f} s")
    if best is not None and best is not record:
        line += f"; best so far {best['loss']:.4f} at step {best['step']}"
    return line
