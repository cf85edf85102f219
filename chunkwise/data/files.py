"""Training and evaluation data, from files to padded token batches.

A ladder of small steps, each usable on its own:

    load_records      path            -> [Record]             raw text, or prompt + response
    tokenize_records  [Record]        -> [TokenizedDocument]  token ids and labels (-100 on prompt tokens)
    make_sequences    documents       -> [Sequence]           packed or truncated to seq_len tokens
    collate           [Sequence]      -> {"input_ids", "attention_mask", "labels"}, each [B, T]

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 where ignored, shifted only
by the loss (`chunkwise.loss.shift_labels`). Every problem with the data is a `DataError` whose one-line
message says what is wrong, where (file and line, or dataset row) and how to fix it, raised while the
data is read, before any model is loaded or step is taken.

`datasets` is optional (`pip install 'chunkwise[datasets]'`): it is imported only for .json, .csv,
.parquet files, `save_to_disk` folders and hub datasets; .txt and .jsonl are read without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .loss import IGNORE_INDEX

logger = logging.getLogger(__name__)


# ----- file data -----

# `datasets.load_dataset` builder for each data-file extension it reads for us.
_DATASET_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
_KNOWN_SUFFIXES = (".txt", ".jsonl", *_DATASET_BUILDERS)


class DataError(ValueError):
    """Bad training/eval data; the message is one line saying what is wrong, where (file, line/record), and how to fix it."""


@dataclass(frozen=True)
class Record:
    """One raw example before tokenisation: either `text`, or both `prompt` and `response`.

    Attributes:
        source: where it came from, for error messages: "data/train.jsonl:12", "docs/a.txt", "name[3]".
        text: a plain-text document (language modelling: every token is a target).
        prompt: instruction data: the prompt's tokens are context only (label -100) ...
        response: ... and the response's tokens are the targets.
    """

    source: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None

    def __post_init__(self):
        instruction = self.prompt is not None or self.response is not None
        complete = (self.prompt is not None and self.response is not None) if instruction else self.text is not None
        if not complete or (instruction and self.text is not None):
            raise ValueError(f"Record {self.source}: give either text, or both prompt and response")

    @property
    def is_instruction(self) -> bool:
        return self.prompt is not None


@dataclass(frozen=True)
class _Fields:
    """Which fields of a JSON line / dataset row hold the example, and the option that names each."""

    text: str
    prompt: str | None
    response: str | None

    @property
    def instruction(self) -> bool:
        return self.prompt is not None

    @property
    def options(self) -> dict[str, str]:
        """{field name: load_records option that chose it}, in the order the fields are read."""
        if self.instruction:
            return {self.prompt: "prompt_field", self.response: "response_field"}
        return {self.text: "text_field"}

    def record(self, source: str, row: dict) -> Record:
        if self.instruction:
            return Record(source, prompt=row[self.prompt], response=row[self.response])
        return Record(source, text=row[self.text])


def load_records(
    path: str,
    *,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    split: str = "train",
) -> list[Record]:
    """Read the raw examples at `path`, in order.

    `path` may be:

    * a `.txt` file (the whole file is one document), or a directory: every `*.txt` below it, sorted
      by path, one document each (empty files are skipped);
    * a `.jsonl` file: one JSON object per line (blank lines skipped); the example is the `text_field`
      string, or, with `prompt_field` and `response_field`, those two strings (instruction data);
    * a `.json`, `.csv` or `.parquet` file, read with `datasets.load_dataset(..., split=split)` (a
      single file is the split "train"; slices such as "train[:100]" work);
    * a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`split` picks
      from a DatasetDict);
    * otherwise, when nothing exists at `path` and it does not look like a local path, a Hugging
      Face hub dataset name, loaded with `datasets.load_dataset(path, split=split)` (needs network).

    Dataset rows take their fields as JSON lines do; their source is "path[row]".

    Raises:
        DataError: the path does not exist, a file cannot be read or parsed, a field is missing or
            not a string, or no example was found.
    """
    fields = _check_fields(text_field, prompt_field, response_field)
    name = os.fspath(path)
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        dataset = _load_saved_dataset(local, name, split)
        return _non_empty(_records_from_dataset(dataset, name, fields), name, f"its split {split!r} has no rows")
    if local.is_dir():
        _check_plain_text_fields(name, fields)
        return _non_empty(_load_text_directory(local), name, "it has no non-empty *.txt file")
    if local.is_file():
        return _non_empty(_load_file(local, name, fields, split), name, "the file is empty")
    if _looks_local(name):
        raise DataError(f"data file {name} does not exist (relative paths start from {os.getcwd()}); check the path")
    dataset = _load_hub_dataset(name, split)
    return _non_empty(_records_from_dataset(dataset, name, fields), name, f"its split {split!r} has no rows")


def _check_fields(text_field: str, prompt_field: str | None, response_field: str | None) -> _Fields:
    if (prompt_field is None) != (response_field is None):
        given = f"prompt_field={prompt_field!r}" if prompt_field is not None else f"response_field={response_field!r}"
        raise DataError(
            f"instruction data needs both prompt_field and response_field, got only {given}; "
            "give both, or neither to train on text_field"
        )
    return _Fields(text_field, prompt_field, response_field)


def _check_plain_text_fields(name: str, fields: _Fields) -> None:
    # Plain text has no fields to split into prompt and response; ignoring the options would
    # silently train on the prompts too.
    if fields.instruction:
        raise DataError(
            f"{name} is plain text, which has no prompt and response fields; give instruction data as "
            "JSONL or a dataset, or drop prompt_field and response_field"
        )


def _non_empty(records: list[Record], name: str, why: str) -> list[Record]:
    if not records:
        raise DataError(f"no examples found in {name}: {why}; add examples or check the path")
    return records


def _looks_local(name: str) -> bool:
    """Whether a path that does not exist was meant as a local one (else it is tried as a hub name).

    Hub names are "name" or "owner/name", so one "/" alone does not make a path local.
    """
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or name.lower().endswith(_KNOWN_SUFFIXES)
    )


def _load_file(file: Path, name: str, fields: _Fields, split: str) -> list[Record]:
    suffix = file.suffix.lower()
    if suffix not in _KNOWN_SUFFIXES:
        raise DataError(
            f"{name}: unsupported file type {file.suffix!r}; use .txt, .jsonl, .json, .csv or .parquet, "
            "a directory of .txt files, or a dataset saved with save_to_disk"
        )
    if suffix == ".txt":
        _check_plain_text_fields(name, fields)
    if file.stat().st_size == 0:
        return []  # nothing to read (and `datasets` fails on an empty file with a bare StopIteration)
    if suffix == ".txt":
        text = _read_text(file, name)
        return [Record(name, text=text)] if text.strip() else []
    if suffix == ".jsonl":
        return _load_jsonl(file, name, fields)
    return _records_from_dataset(_load_dataset_file(file, name, suffix, split), name, fields)


def _read_text(file: Path, name: str) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the text
    except UnicodeDecodeError as error:
        raise DataError(
            f"{name} is not UTF-8 text (bad byte at offset {error.start}); convert it to UTF-8 or remove it"
        ) from error
    except OSError as error:
        raise DataError(f"cannot read {name}: {error.strerror or error}; check that it is a readable file") from error


def _load_text_directory(directory: Path) -> list[Record]:
    """One record per non-empty `*.txt` file below `directory`, sorted by path (subdirectories included)."""
    files = [file for file in directory.rglob("*") if file.suffix.lower() == ".txt" and file.is_file()]
    files.sort(key=lambda file: file.relative_to(directory).parts)
    records = []
    for file in files:
        text = _read_text(file, str(file))
        if text.strip():  # an empty file holds no document; skipping it loses nothing
            records.append(Record(str(file), text=text))
    return records


def _load_jsonl(file: Path, name: str, fields: _Fields) -> list[Record]:
    records = []
    for number, line in _read_lines(file, name):
        if line.strip():
            source = f"{name}:{number}"
            row = _parse_json_object(line, source)
            records.append(fields.record(source, _checked_row(row, fields, source, "line")))
    return records


def _read_lines(file: Path, name: str):
    """Yield `(line number, text)`; decoding line by line lets an encoding error name its line."""
    try:
        with open(file, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{name}:{number} is not UTF-8 text; convert the file to UTF-8") from error
                yield number, line
    except OSError as error:
        raise DataError(f"cannot read {name}: {error.strerror or error}; check that it is a readable file") from error


def _parse_json_object(line: str, source: str) -> dict:
    try:
        value = json.loads(line.rstrip("\r\n"))  # without the newline, an error's column is on this line
    except json.JSONDecodeError as error:
        raise DataError(f"{source} is not valid JSON ({error.msg}, column {error.colno}); fix or remove the line") from error
    if not isinstance(value, dict):
        raise DataError(
            f"{source} is a JSON {type(value).__name__}, not an object; "
            'write each line as an object such as {"text": "..."}'
        )
    return value


def _checked_row(row: dict, fields: _Fields, source: str, what: str) -> dict:
    """`row`, after checking that every field the example needs is there and is a string."""
    for field, option in fields.options.items():
        if field not in row:
            keys = ", ".join(repr(key) for key in row) or "none"
            raise DataError(
                f"{source} has no field {field!r} (its keys: {keys}); set {option} to the right field or fix the {what}"
            )
        if not isinstance(row[field], str):
            raise DataError(f"{source}: field {field!r} is {type(row[field]).__name__}, not a string; fix the {what}")
    return row


# Files other than .txt / .jsonl, saved datasets and hub datasets go through `datasets`.


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            "reading .json, .csv, .parquet files, saved datasets and hub datasets needs the `datasets` "
            "package: pip install 'chunkwise[datasets]'"
        ) from error
    return datasets


def _is_saved_dataset(directory: Path) -> bool:
    # The files `DatasetDict.save_to_disk` and `Dataset.save_to_disk` write at the top level.
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_saved_dataset(directory: Path, name: str, split: str):
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as error:  # any failure inside `datasets` is a data problem to report in one line
        raise DataError(
            f"cannot load the saved dataset in {name} ({_one_line(error)}); save it again with save_to_disk"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            splits = ", ".join(repr(key) for key in loaded) or "none"
            raise DataError(f"{name} has no split {split!r} (its splits: {splits}); choose one of them as the split")
        loaded = loaded[split]
    return loaded


def _load_dataset_file(file: Path, name: str, suffix: str, split: str):
    datasets = _import_datasets()
    builder = _DATASET_BUILDERS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(file), split=split)
    except Exception as error:  # malformed file, unknown split, ...: report the reason in one line
        raise DataError(
            f"cannot read {name} as {builder.upper()} ({_one_line(error)}); check the file and the split"
        ) from error


def _load_hub_dataset(name: str, split: str):
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # no network, unknown name, gated, missing config: one line says which
        raise DataError(
            f"{name} does not exist locally and could not be loaded from the Hugging Face hub "
            f"({_one_line(error)}); check the path or the dataset name"
        ) from error


def _one_line(error: Exception) -> str:
    """`ErrorType: first line of the message`, cut to a readable length.

    A wrapped error is described by its cause: `datasets` wraps the parser's precise message
    ("JSON parse error: ... in row 0") in a generic DatasetGenerationError.
    """
    if error.__cause__ is not None:
        error = error.__cause__
    message = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _records_from_dataset(dataset, name: str, fields: _Fields) -> list[Record]:
    columns = list(dataset.column_names)
    for field, option in fields.options.items():
        if field not in columns:
            listed = ", ".join(repr(column) for column in columns) or "none"
            raise DataError(f"{name} has no column {field!r} (its columns: {listed}); set {option} to the right column")
    # Column by column: one Arrow read per field instead of one per row.
    values = [list(dataset[field]) for field in fields.options]
    records = []
    for row_index, row_values in enumerate(zip(*values)):
        source = f"{name}[{row_index}]"
        row = _checked_row(dict(zip(fields.options, row_values)), fields, source, "data")
        records.append(fields.record(source, row))
    return records


@dataclass(frozen=True)
class TokenizedDocument:
    """One example as tokens.

    Attributes:
        source: where the example came from (`Record.source`).
        input_ids: `[n]` token ids, n >= 2.
        labels: `[n]` the targets, aligned with `input_ids` (not shifted): the token itself, or
            IGNORE_INDEX (-100) on prompt tokens.
    """

    source: str
    input_ids: list[int]
    labels: list[int]


def tokenize_records(records: list[Record], tokenizer) -> list[TokenizedDocument]:
    """Tokenise each record with a Hugging Face tokenizer, in order.

    Text: the tokenizer's ids with its default special tokens (e.g. BOS), then `eos_token_id` when the
    tokenizer has one and did not put it last already, so a model learns where a document ends and
    packed documents stay separated; every token is a target.

    Instruction: `tokenizer(prompt)` (default special tokens) followed by `tokenizer(response)`
    without special tokens, plus EOS when there is one; only response tokens (and EOS) are targets.
    The two are tokenised separately and joined as they are, so any separator (a space, a newline,
    a chat template) must already be in the prompt or the response.

    Raises:
        DataError: naming the record, for an empty text, a document of fewer than two tokens, or an
            instruction example with nothing to predict.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    documents = []
    for record in records:
        if record.is_instruction:
            prompt_ids = _token_ids(tokenizer, record.prompt)
            response_ids = _token_ids(tokenizer, record.response, add_special_tokens=False)
            if eos is not None:
                response_ids.append(eos)
            input_ids = prompt_ids + response_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        else:
            if not record.text.strip():
                # Caught before tokenising: BOS + EOS alone would pass the two-token check below.
                raise DataError(
                    f"{record.source} is empty; every document needs at least two tokens (one token "
                    "predicts the next): remove it or fix the data"
                )
            input_ids = _token_ids(tokenizer, record.text)
            if eos is not None and (not input_ids or input_ids[-1] != eos):
                input_ids.append(eos)
            labels = list(input_ids)
        _check_document(record.source, input_ids, labels)
        documents.append(TokenizedDocument(record.source, input_ids, labels))
    return documents


def _token_ids(tokenizer, text: str, **kwargs) -> list[int]:
    return list(tokenizer(text, **kwargs)["input_ids"])


def _check_document(source: str, input_ids: list[int], labels: list[int]) -> None:
    count = len(input_ids)
    if count < 2:
        raise DataError(
            f"{source} has {count} token{'' if count == 1 else 's'}; every document needs at least two "
            "(one token predicts the next): remove it or fix the data"
        )
    # Token 0 is never predicted (the loss shifts labels by one), so it cannot be the only target.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(
            f"{source} has no target token: its response is empty and the tokenizer has no EOS token; "
            "remove it or give it a response"
        )


@dataclass(frozen=True)
class Sequence:
    """One training row before padding.

    Attributes:
        input_ids: `[n]` token ids, 2 <= n <= seq_len.
        labels: `[n]` aligned targets (not shifted), IGNORE_INDEX where ignored; at least one of
            `labels[1:]` is a real target.
    """

    input_ids: list[int]
    labels: list[int]


PACKING_MODES = ("pack", "truncate")


def make_sequences(documents: list[TokenizedDocument], *, seq_len: int, packing: str) -> list[Sequence]:
    """Cut documents into training rows of at most `seq_len` tokens.

    packing="pack": all documents concatenated in order (ids and labels alike, so documents keep
    their own BOS/EOS and prompt masks) and cut into consecutive `seq_len` blocks; a final partial
    block is kept if it has at least two tokens. No padding is wasted; a block may span documents.
    packing="truncate": one row per document, its first `seq_len` tokens (the rest is dropped;
    shorter documents are padded later, in `collate`).

    Rows with no real target after the one-token shift (`labels[1:]` all -100, e.g. an instruction
    example whose prompt fills all `seq_len` tokens) are dropped, with a logged warning.

    Raises:
        ValueError: `seq_len` is not an integer >= 2, or `packing` is unknown.
        DataError: no row with a target is left.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one token predicts the next), got {seq_len!r}")
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(map(repr, PACKING_MODES))}, got {packing!r}")
    if not documents:
        raise DataError("no documents to make training sequences from; check the data path")
    rows = _pack(documents, seq_len) if packing == "pack" else _truncate(documents, seq_len)
    kept = [row for row in rows if _has_target(row.labels)]
    if not kept:
        raise DataError(
            f"none of the {len(rows)} sequences of at most {seq_len} tokens has a target token (prompts "
            "longer than seq_len leave no response tokens); raise seq_len or shorten the prompts"
        )
    if len(kept) < len(rows):
        dropped = len(rows) - len(kept)
        logger.warning(
            "dropped %d of %d sequences with no target token (prompt longer than seq_len=%d)", dropped, len(rows), seq_len
        )
    return kept


def _pack(documents: list[TokenizedDocument], seq_len: int) -> list[Sequence]:
    input_ids = list(itertools.chain.from_iterable(document.input_ids for document in documents))
    labels = list(itertools.chain.from_iterable(document.labels for document in documents))
    return [
        Sequence(input_ids[start : start + seq_len], labels[start : start + seq_len])
        for start in range(0, len(input_ids), seq_len)
        if len(input_ids) - start >= 2  # a lone last token predicts nothing
    ]


def _truncate(documents: list[TokenizedDocument], seq_len: int) -> list[Sequence]:
    return [Sequence(document.input_ids[:seq_len], document.labels[:seq_len]) for document in documents]


def _has_target(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])


def read_sequences(
    path: str,
    tokenizer,
    *,
    seq_len: int | None,
    packing: str,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    split: str = "train",
) -> list[Sequence]:
    """The whole ladder from a data path to rows: `load_records` → `tokenize_records` → `make_sequences`.

    `seq_len=None` keeps every document whole (evaluation of long documents).
    """
    records = load_records(path, text_field=text_field, prompt_field=prompt_field, response_field=response_field, split=split)
    documents = tokenize_records(records, tokenizer)
    if seq_len is None:
        seq_len = max(len(document.input_ids) for document in documents)
    return make_sequences(documents, seq_len=seq_len, packing=packing)


def collate(sequences: list[Sequence], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one.

    Returns:
        "input_ids": `[B, T]` long, `pad_token_id` on padding;
        "attention_mask": `[B, T]` long, 1 on real tokens, 0 on padding;
        "labels": `[B, T]` long, IGNORE_INDEX (-100) on padding, so padding is never a target.
    """
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(
            f"pad_token_id must be a token id (int), got {pad_token_id!r}; a tokenizer without a pad "
            "token can pad with its eos_token_id (padding is masked out)"
        )
    batch_size, width = len(sequences), max(len(sequence.input_ids) for sequence in sequences)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        length = len(sequence.input_ids)
        input_ids[row, :length] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(sequence.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----- the synthetic long-range task -----


SYNTHETIC = "synthetic"
"""The `--data` value (and the default without `--data`) that selects `RecallTask`."""


@dataclass(frozen=True)
class RecallTask:
    """Key→value recall across a long sequence, generated on the fly: the built-in demo's data.

    A sequence of `seq_len` tokens:

        <bos> k₁ v₁ … k_P v_P (× repeats)   f f f … f   ? k_π1 v_π1 … ? k_πP v_πP
        └── the pairs, at the start ──────┘  filler     └── every key queried once, at the end ┘

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

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "?")

    def __post_init__(self):
        for name in ("num_pairs", "repeats", "num_keys", "num_values", "num_fillers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecallTask.{name} must be a positive integer, got {value!r}")
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

        pairs = [bos] + [token for key, value in zip(keys, values) for token in (key, value)] * self.repeats
        queries = [token for i in order for token in (query, keys[i], values[i])]
        num_filler = seq_len - len(pairs) - len(queries)
        filler = (filler_base + torch.randint(self.num_fillers, (num_filler,), generator=generator)).tolist()
        input_ids = pairs + filler + queries

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


def synthetic_task_for(vocab_size: int) -> RecallTask:
    """The demo task over token ids below `vocab_size`: fewer filler symbols for a smaller vocabulary."""
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


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any id works), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
