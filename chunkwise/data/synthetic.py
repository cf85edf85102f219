"""The built-in synthetic long-range task (key→value recall), generated on the fly: the demo's data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.names import PAIR_DEPTHS, SYNTHETIC  # noqa: F401  (SYNTHETIC re-exported)
from chunkwise.data.sequences import Sequence, collate


@dataclass(frozen=True)
class RecallTask:
    """Key→value recall across a long sequence, generated on the fly: the built-in demo's data.

    A sequence of `seq_len` tokens:

        <bos> k₁ v₁ … k_P v_P (× repeats)   f f f … f   ? k_π1 v_π1 … ? k_πP v_πP
        └── the pairs, at the start ──────┘  filler     └── every key queried once, at the end ┘

    With `pair_depth="random"` the block of pairs sits at a depth drawn uniformly per sequence inside the
    filler (`<bos> f … f k₁ v₁ … f … f ? k …`): the fact anywhere in the document, the question still at the end.

    Keys are distinct, values are drawn without replacement, filler tokens are random; a value
    appears nowhere but in the pairs block and in its answer. Only the
    answers (the values in the query section) are labelled, so the loss and accuracy measure one thing:
    can the model carry what it saw at the start across thousands of tokens — through the KV cache
    that chunk-wise training passes from chunk to chunk. Chance accuracy is 1 / `num_values`.

    The vocabulary is word-level ("k3", "v17", "f5", "?"), so sequences are also plain text that the
    task's own tokenizer reads back; the demo saves that tokenizer with the model.
    """

    num_pairs: int = 1
    """Key→value pairs per sequence (each is queried once)."""
    repeats: int = 4
    """Times the block of pairs is stated at the start (more copies: an easier target to find)."""
    num_keys: int = 32
    num_values: int = 32
    num_fillers: int = 8
    """Filler symbols; few of them make the values stand out, which lets a small model learn in minutes."""
    pair_depth: str = "start"
    """Where the pairs are stated: "start" (right after <bos>) or "random" (a uniformly random depth in the
    filler, per sequence). "start" sequences are the same whatever this option's history."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "?")

    def __post_init__(self):
        for name in ("num_pairs", "repeats", "num_keys", "num_values", "num_fillers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecallTask.{name} must be a positive integer, got {value!r}")
        if self.pair_depth not in PAIR_DEPTHS:
            raise ValueError(f"RecallTask.pair_depth must be one of {', '.join(PAIR_DEPTHS)}, got {self.pair_depth!r}")
        if self.num_pairs > min(self.num_keys, self.num_values):
            raise ValueError(f"RecallTask.num_pairs ({self.num_pairs}) cannot exceed num_keys or num_values")

    # ----- vocabulary: specials, then keys, values, fillers; ids follow this order -----

    @property
    def vocabulary(self) -> list[str]:
        return [
            *self.SPECIALS,
            *(f"k{i}" for i in range(self.num_keys)),
            *(f"v{i}" for i in range(self.num_values)),
            *(f"f{i}" for i in range(self.num_fillers)),
        ]

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + self.num_keys + self.num_values + self.num_fillers

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values

    def min_length(self) -> int:
        """Shortest sequence that holds the pairs, one filler token and the queries."""
        return 1 + 2 * self.num_pairs * self.repeats + 1 + 3 * self.num_pairs

    def tokenizer(self):
        """A word-level `PreTrainedTokenizerFast` over the task's vocabulary (it adds no special tokens itself)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocabulary = {token: index for index, token in enumerate(self.vocabulary)}
        core = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )

    # ----- sampling -----

    def sample(self, seq_len: int, generator: torch.Generator) -> Sequence:
        """One sequence of exactly `seq_len` tokens, drawn with `generator`."""
        if seq_len < self.min_length():
            raise ValueError(f"RecallTask with {self.num_pairs} pairs needs seq_len >= {self.min_length()}, got {seq_len}")
        key_base = len(self.SPECIALS)
        value_base = key_base + self.num_keys
        filler_base = value_base + self.num_values
        bos, query = self.SPECIALS.index("<bos>"), self.SPECIALS.index("?")
        keys = (key_base + torch.randperm(self.num_keys, generator=generator)[: self.num_pairs]).tolist()
        values = (value_base + torch.randperm(self.num_values, generator=generator)[: self.num_pairs]).tolist()
        order = torch.randperm(self.num_pairs, generator=generator).tolist()

        pairs = [token for key, value in zip(keys, values) for token in (key, value)] * self.repeats
        queries = [token for i in order for token in (query, keys[i], values[i])]
        num_filler = seq_len - 1 - len(pairs) - len(queries)
        filler = (filler_base + torch.randint(self.num_fillers, (num_filler,), generator=generator)).tolist()
        # Drawn after everything else, so that "start" sequences keep their draws (and the demo its data).
        depth = 0 if self.pair_depth == "start" else int(torch.randint(num_filler + 1, (), generator=generator))
        input_ids = [bos] + filler[:depth] + pairs + filler[depth:] + queries

        labels = [IGNORE_INDEX] * seq_len
        first_query = seq_len - len(queries)
        for answer in range(first_query + 2, seq_len, 3):  # "? k v": the value is the answer
            labels[answer] = input_ids[answer]
        return Sequence(input_ids, labels)

    def sequence(self, position: int, *, seq_len: int, seed: int) -> Sequence:
        """Sequence number `position` of the stream for `seed`: always the same sequence, so a resumed run,
        another rank, or another batch size reads the same stream knowing only the position."""
        return self.sample(seq_len, torch.Generator().manual_seed(seed * 1_000_003 + position))

    def batch(self, index: int, *, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
        """Micro-batch number `index`: sequences `index * batch_size` ... `(index + 1) * batch_size - 1`."""
        positions = range(index * batch_size, (index + 1) * batch_size)
        rows = [self.sequence(p, seq_len=seq_len, seed=seed) for p in positions]
        return collate(rows, pad_token_id=self.SPECIALS.index("<pad>"))


def held_out_seed(seed: int) -> int:
    """Seed of the evaluation stream for a training seed: positions of the two streams never meet
    (a stream's generators are seeded `seed * 1_000_003 + position`)."""
    return seed + 1_000


DEMO_TASK = RecallTask()
"""The task `chunkwise train` runs without `--data` (and the vocabulary of the demo model)."""


def synthetic_task_for(vocab_size: int, pair_depth: str = "start") -> RecallTask:
    """The demo task over token ids below `vocab_size` (fewer filler symbols for a smaller vocabulary), with its
    pairs at `pair_depth` ("start" or "random", see `RecallTask.pair_depth`)."""
    if pair_depth != DEMO_TASK.pair_depth:
        return dataclasses.replace(synthetic_task_for(vocab_size), pair_depth=pair_depth)
    if vocab_size >= DEMO_TASK.vocab_size:
        return DEMO_TASK
    room = vocab_size - (DEMO_TASK.vocab_size - DEMO_TASK.num_fillers)
    if room < 1:
        raise ValueError(
            f"the synthetic task needs at least {DEMO_TASK.vocab_size - DEMO_TASK.num_fillers + 1} token ids but the "
            f"model's vocabulary has {vocab_size}; give --data, or use a model with a larger vocabulary"
        )
    return dataclasses.replace(DEMO_TASK, num_fillers=room)


def held_out_batches(task: RecallTask, *, num_sequences: int, batch_size: int, seq_len: int, seed: int) -> list[dict]:
    """Evaluation batches of `task` from the held-out stream of training seed `seed` (see `held_out_seed`)."""
    return [
        task.batch(index, batch_size=batch_size, seq_len=seq_len, seed=held_out_seed(seed))
        for index in range(math.ceil(num_sequences / batch_size))
    ]
