"""Training and evaluation data, from files to padded token batches.

A ladder of small steps, each usable on its own:

    load_records      path            -> [Record]             raw text, prompt + response, or a conversation
    tokenize_records  [Record]        -> [TokenizedDocument]  token ids and labels (-100 on prompt tokens)
    make_sequences    documents       -> [Sequence]           packed or truncated to seq_len tokens
    collate           [Sequence]      -> {"input_ids", "attention_mask", "labels"}, each [B, T]

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 where ignored, shifted only
by the loss (`chunkwise.core.loss.shift_labels`). Every problem with the data is a `DataError` whose one-line
message says what is wrong, where (file and line, or dataset row) and how to fix it, raised while the
data is read, before any model is loaded or step is taken.

`datasets` is optional (`pip install 'chunkwise[datasets]'`): it is imported only for .json, .csv,
.parquet files, `save_to_disk` folders and hub datasets; .txt and .jsonl are read without it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


# ----- file data -----

# `datasets.load_dataset` builder for each data-file extension it reads for us.
_DATASET_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
_KNOWN_SUFFIXES = (".txt", ".jsonl", *_DATASET_BUILDERS)


class DataError(ValueError):
    """Bad training/eval data; the message is one line saying what is wrong, where (file, line/record), and how to fix it."""


@dataclass(frozen=True)
class Record:
    """One raw example before tokenisation: `text`, or both `prompt` and `response`, or `messages`.

    Attributes:
        source: where it came from, for error messages: "data/train.jsonl:12", "docs/a.txt", "name[3]".
        text: a plain-text document (language modelling: every token is a target).
        prompt: instruction data: the prompt's tokens are context only (label -100) ...
        response: ... and the response's tokens are the targets.
        messages: a conversation, `({"role": ..., "content": ...}, ...)` (TRL's conversational format): rendered
            with the tokenizer's chat template, the assistant turns' tokens are the targets (`data.conversations`).
    """

    source: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict, ...] | None = None

    def __post_init__(self):
        instruction = self.prompt is not None or self.response is not None
        kinds = [self.text is not None, instruction, self.messages is not None]
        if sum(kinds) != 1 or (instruction and (self.prompt is None or self.response is None)):
            conversation = ", or messages" if self.messages is not None else ""
            raise ValueError(f"Record {self.source}: give either text, or both prompt and response{conversation}")

    @property
    def is_instruction(self) -> bool:
        return self.prompt is not None

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None


# A row without the text field but with this one is read as a conversation (TRL's conversational format).
MESSAGES = "messages"


@dataclass(frozen=True)
class _Fields:
    """Which fields of a JSON line / dataset row hold the example, and the option that names each."""

    text: str
    prompt: str | None
    response: str | None
    messages: str | None = None

    @property
    def instruction(self) -> bool:
        return self.prompt is not None

    @property
    def options(self) -> dict[str, str]:
        """{field name: load_records option that chose it}, in the order the fields are read."""
        if self.messages is not None:
            return {self.messages: "messages_field"}
        if self.instruction:
            return {self.prompt: "prompt_field", self.response: "response_field"}
        return {self.text: "text_field"}

    def detected(self, keys, name: str) -> _Fields:
        """These fields, or a conversation's when the data has no text field but a `messages` one (logged once)."""
        if self.instruction or self.messages is not None or self.text in keys or MESSAGES not in keys:
            return self
        logger.info("%s: no %r field, reading the conversations in %r (chat template, loss on assistant turns)", name, self.text, MESSAGES)
        return dataclasses.replace(self, messages=MESSAGES)

    def record(self, source: str, row: dict) -> Record:
        if self.messages is not None:
            return Record(source, messages=_checked_messages(row[self.messages], source, self.messages))
        if self.instruction:
            return Record(source, prompt=row[self.prompt], response=row[self.response])
        return Record(source, text=row[self.text])


def _checked_messages(value, source: str, field: str) -> tuple[dict, ...]:
    """A conversation's turns, checked: a list of {"role": str, "content": str} with at least one assistant turn."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{source}: field {field!r} must be a non-empty list of {{\"role\", \"content\"}} turns, got "
                        f"{type(value).__name__}; fix the data")
    for number, turn in enumerate(value, start=1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataError(f"{source}: turn {number} of {field!r} is not a {{\"role\": str, \"content\": str}} object; fix the data")
    if not any(turn["role"] == "assistant" for turn in value):
        raise DataError(f"{source}: the conversation has no assistant turn, so nothing to train on; add one or remove it")
    return tuple({"role": turn["role"], "content": turn["content"]} for turn in value)


def load_records(
    path: str,
    *,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    split: str = "train",
    glob: str = "*.txt",
) -> list[Record]:
    """Read the raw examples at `path`, in order.

    `path` may be:

    * a `.txt` file (the whole file is one document), or a directory: every file below it whose name matches
      `glob` (default `*.txt`; several patterns separated by commas, e.g. "*.txt,*.md"), sorted by path, one
      UTF-8 text document each (empty files are skipped);
    * a `.jsonl` file: one JSON object per line (blank lines skipped); the example is the `text_field`
      string, or, with `prompt_field` and `response_field`, those two strings (instruction data), or, with
      `messages_field`, a list of `{"role", "content"}` turns (a conversation). A row with no `text_field`
      but a "messages" field is read as a conversation without being told;
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
    fields = _check_fields(text_field, prompt_field, response_field, messages_field)
    name = os.fspath(path)
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        dataset = _load_saved_dataset(local, name, split)
        return _non_empty(_records_from_dataset(dataset, name, fields), name, f"its split {split!r} has no rows")
    if local.is_dir():
        _check_plain_text_fields(name, fields)
        why = "it has no non-empty *.txt file" if glob == "*.txt" else f"it has no non-empty file matching {glob!r} (check the glob)"
        return _non_empty(_load_text_directory(local, glob), name, why)
    if local.is_file():
        return _non_empty(_load_file(local, name, fields, split), name, "the file is empty")
    check_data_path(name)
    dataset = _load_hub_dataset(name, split)
    return _non_empty(_records_from_dataset(dataset, name, fields), name, f"its split {split!r} has no rows")


def _check_fields(text_field: str, prompt_field: str | None, response_field: str | None, messages_field: str | None) -> _Fields:
    if messages_field is not None and (prompt_field is not None or response_field is not None):
        raise DataError("a conversation's messages_field and instruction data's prompt_field / response_field are two "
                        "formats: give one of them")
    if (prompt_field is None) != (response_field is None):
        given = f"prompt_field={prompt_field!r}" if prompt_field is not None else f"response_field={response_field!r}"
        raise DataError(
            f"instruction data needs both prompt_field and response_field, got only {given}; "
            "give both, or neither to train on text_field"
        )
    return _Fields(text_field, prompt_field, response_field, messages_field)


def _check_plain_text_fields(name: str, fields: _Fields) -> None:
    # Plain text has no fields to split into prompt and response; ignoring the options would
    # silently train on the prompts too.
    if fields.instruction:
        raise DataError(
            f"{name} is plain text, which has no prompt and response fields; give instruction data as "
            "JSONL or a dataset, or drop prompt_field and response_field"
        )
    if fields.messages is not None:
        raise DataError(f"{name} is plain text, which has no messages field; give conversations as JSONL or a dataset, "
                        "or drop messages_field")


def _non_empty(records: list[Record], name: str, why: str) -> list[Record]:
    if not records:
        raise DataError(f"no examples found in {name}: {why}; add examples or check the path")
    return records


def check_data_path(path: str) -> None:
    """DataError for a path meant as local (see `_looks_local`) that does not exist; a hub dataset name passes.

    `load_records` applies it; the command line calls it before anything heavy loads, so a mistyped path is
    reported at once.
    """
    name = os.fspath(path)
    if not Path(name).expanduser().exists() and _looks_local(name):
        raise DataError(f"data file {name} does not exist (relative paths start from {os.getcwd()}); check the path")


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


def _load_text_directory(directory: Path, glob: str = "*.txt") -> list[Record]:
    """One record per non-empty file below `directory` whose name matches one of the comma-separated patterns of
    `glob`, sorted by path; each pattern is matched in every subfolder, as `Path.rglob` does (`*.md`, `notes/*.md`)."""
    patterns = [pattern.strip() for pattern in glob.split(",") if pattern.strip()]
    if not patterns:
        raise DataError(f"glob {glob!r} holds no pattern; give one such as '*.txt' or '*.txt,*.md'")
    # `*.txt` also matches "A.TXT", as the folder reader always did; other patterns match as written.
    matched = {file for pattern in patterns for file in directory.rglob(pattern) if file.is_file()}
    if "*.txt" in patterns:
        matched |= {file for file in directory.rglob("*") if file.suffix.lower() == ".txt" and file.is_file()}
    files = sorted(matched, key=lambda file: file.relative_to(directory).parts)
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
            if not records:  # the first row decides whether rows without the text field are conversations
                fields = fields.detected(row, name)
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
        if field != fields.messages and not isinstance(row[field], str):  # a conversation's turns are checked by the record
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
    fields = fields.detected(columns, name)
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
