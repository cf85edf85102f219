"""Command-line options generated from a typed dataclass config, and the parsing of list-valued options.

    add_config_options(parser, TrainConfig)     # --model, --seq-len, ..., --no-progress

Each field becomes one option, named after it (`chunk_size` → `--chunk-size`); its help text is the field's
docstring (as litgpt's `args.py` documents its fields), its type comes from the annotation, its choices
from the config's `CHOICES`. The options only carry values: checking them is the config's job, so a check
has one home and the Python API and the command line report a bad value alike.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing


class UsageError(Exception):
    """A problem with the user's input: printed as one line, no stack trace (unless --debug)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (a string literal right after the field), one line each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def int_or_text(text: str) -> int | str:
    """argparse type of an `int | str` field (e.g. --chunk-size 512 or auto): a number if it is one; the config checks the rest."""
    try:
        return int(text)
    except ValueError:
        return text


def _value_type(annotation) -> type | typing.Callable:
    """The argparse `type` of a field annotated `annotation`: int, float or str, `int_or_text` for `int | str`."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(annotation, types.UnionType) else [annotation]
    if set(members) == {int, str}:
        return int_or_text
    if len(members) != 1 or members[0] not in (int, float, str):
        raise TypeError(f"no command-line type for a field annotated {annotation}")
    return members[0]


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of dataclass `cls`; only the options given on the command line are set.

    A `bool` field that defaults to False becomes a flag (`--offload-kv`), one that defaults to True a
    negated flag (`--no-progress`). Help text: the field's docstring, with the default unless it names one; a
    field without a docstring is an error, so that `--help` describes every option.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    choices = getattr(cls, "CHOICES", {})
    for field in dataclasses.fields(cls):
        if field.name not in docs:
            raise TypeError(f"{cls.__name__}.{field.name} has no docstring: it is the help of {option_name(field.name)}")
        help_text = docs[field.name]
        if field.default not in (None, False, True) and "default" not in help_text.lower():
            help_text += f" (default {field.default})"
        help_text = help_text.replace("%", "%%")
        if hints[field.name] is bool:
            if field.default:
                parser.add_argument(option_name("no_" + field.name), dest=field.name, action="store_false", default=argparse.SUPPRESS,
                                    help=help_text)
            else:
                parser.add_argument(option_name(field.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        metavar = "{" + ",".join(map(str, choices[field.name])) + "}" if field.name in choices else None
        parser.add_argument(option_name(field.name), type=_value_type(hints[field.name]), metavar=metavar, default=argparse.SUPPRESS,
                            help=help_text)


# The data readers' parameters (`chunkwise.data.files.load_records(text_field=...)`) as the command line spells them.
_DATA_FIELDS = re.compile(r"\b(text|prompt|response|chosen|rejected)_field\b")


def command_line_spelling(message: str) -> str:
    """A data error's message with the readers' parameter names (`text_field`) spelled as options (`--text-field`):
    the data layer speaks to Python callers, the command line's user gave an option."""
    return _DATA_FIELDS.sub(lambda match: f"--{match.group(1)}-field", message)


def parse_list(text: str, option: str, convert=str) -> tuple:
    """A comma-separated option (`--lengths 1024,2048`) as a tuple of `convert`ed items; UsageError if empty or malformed."""
    try:
        items = tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        items = ()
    if not items:
        example = {int: "1024,2048", float: "0,0.5,1"}.get(convert, "full,seco")
        raise UsageError(f"{option} must be a comma-separated list, e.g. {example}; got {text!r}")
    return items


def lengths_option(text: str) -> tuple[int, ...]:
    """argparse type of `eval --seq-len`: one length, or several for the probes."""
    try:
        return parse_list(text, "--seq-len", int)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def chunk_size_option(text: str) -> int | str:
    """argparse type of `plan --chunk-size`: a number of tokens, or "auto"."""
    value = int_or_text(text)
    if value != "auto" and not (isinstance(value, int) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens or auto, got {text!r}")
    return value


def documents_option(text: str) -> tuple[int, ...]:
    """argparse type of `--documents`: a packed row's document lengths, in row order.

    Comma-separated items, each a length or `LENGTHxCOUNT`: "4096x8" is 8 documents of 4096 tokens,
    "1024,2048,4096" three documents, "8192x2,4096x4" six.
    """
    lengths = []
    for item in text.split(","):
        length, _, count = item.strip().lower().partition("x")
        try:
            length, count = int(length), int(count) if count else 1
        except ValueError:
            length = count = 0
        if length < 1 or count < 1:
            raise argparse.ArgumentTypeError(f"must be document lengths such as 4096x8 (8 documents of 4096 tokens) or "
                                             f"1024,2048,4096; got {text!r}")
        lengths += [length] * count
    return tuple(lengths)
