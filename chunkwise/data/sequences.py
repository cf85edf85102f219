"""Documents to training rows: tokenize, pack or truncate to `seq_len`, collate into padded batches."""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from dataclasses import dataclass

import torch

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.conversations import check_chat_template, conversation_tokens
from chunkwise.data.files import DataError, Record, load_records
from chunkwise.data.names import DEPRECATED_PACKING, PACKING_MODES, canonical_packing  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


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


def tokenize_records(records: list[Record], tokenizer, *, response_separator: str = "") -> list[TokenizedDocument]:
    """Tokenise each record with a Hugging Face tokenizer, in order.

    Text: the tokenizer's ids with its default special tokens (e.g. BOS), then `eos_token_id` when the
    tokenizer has one and did not put it last already, so a model learns where a document ends and
    packed documents stay separated; every token is a target.

    Instruction: `tokenizer(prompt + response_separator)` (default special tokens) followed by
    `tokenizer(response)` without special tokens, plus EOS when there is one; only response tokens (and
    EOS) are targets. The two are tokenised separately and joined with nothing between them but
    `response_separator` (default none: a space or newline must be in the prompt, the response or the
    separator; a chat template is what conversations are for).

    Conversation: rendered with the tokenizer's chat template; the assistant turns' tokens are the targets
    (`chunkwise.data.conversations`: rendered prefix by prefix, checked token by token). No EOS is added:
    the template closes each turn with its own end token, which is a target.

    Raises:
        DataError: naming the record, for an empty text, a document of fewer than two tokens, or an
            instruction example with nothing to predict.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    first_conversation = next((record for record in records if record.is_conversation), None)
    if first_conversation is not None:  # one line for the whole data set, before any is tokenised
        check_chat_template(tokenizer, first_conversation.source)
    documents = []
    for record in records:
        if record.is_conversation:
            input_ids, labels = conversation_tokens(tokenizer, record.messages, record.source)
        elif record.is_instruction:
            prompt_ids = _token_ids(tokenizer, record.prompt + response_separator)
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
        position_ids: `[n]` each token's position in its document, restarting at 0 where a document
            starts (packing="documents"); None: one stream, positions 0..n-1.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def make_sequences(documents: list[TokenizedDocument], *, seq_len: int, packing: str) -> list[Sequence]:
    """Cut documents into training rows of at most `seq_len` tokens.

    packing="documents" (padding-free packing): each row holds several whole documents, kept apart.
    A document longer than `seq_len` is first cut into `seq_len`-token pieces, each then a document of
    its own (as TRL does). Rows are filled best-fit, longest piece first (few rows, little padding);
    inside a row the pieces keep the data's order. Each row carries `position_ids` that restart at 0
    where a piece starts, which the engine reads as a document boundary (per-document attention), and
    the label of each piece's first token is IGNORE_INDEX, so no token is trained to predict the next
    document's first (as transformers' `DataCollatorWithFlattening` does).
    packing="concat": all documents concatenated in order (ids and labels alike, so documents keep
    their own BOS/EOS and prompt masks) and cut into consecutive `seq_len` blocks; a final partial
    block is kept if it has at least two tokens. A block may span documents, and then a document
    attends to the ones before it in its block, its positions continuing theirs.
    packing="truncate": one row per document, its first `seq_len` tokens (the rest is dropped;
    shorter documents are padded later, in `collate`).
    packing="pack" is the old name of "concat" (deprecated).

    Rows with no real target after the one-token shift (`labels[1:]` all -100, e.g. an instruction
    example whose prompt fills all `seq_len` tokens) are dropped, with a logged warning; so are such
    pieces with "documents".

    Raises:
        ValueError: `seq_len` is not an integer >= 2, or `packing` is unknown.
        DataError: no row with a target is left.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one token predicts the next), got {seq_len!r}")
    packing = canonical_packing(packing)
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(map(repr, PACKING_MODES))}, got {packing!r}")
    if not documents:
        raise DataError("no documents to make training sequences from; check the data path")
    if packing == "documents":
        rows = _pack_documents(document_pieces(documents, seq_len=seq_len), seq_len)
    else:
        rows = _concatenate(documents, seq_len) if packing == "concat" else _truncate(documents, seq_len)
    kept = [row for row in rows if _has_target(row.labels)]
    if not kept:
        raise DataError(
            f"none of the {len(rows) or len(documents)} sequences of at most {seq_len} tokens has a target token (prompts "
            "longer than seq_len leave no response tokens); raise seq_len or shorten the prompts"
        )
    if len(kept) < len(rows):
        dropped = len(rows) - len(kept)
        logger.warning(
            "dropped %d of %d sequences with no target token (prompt longer than seq_len=%d)", dropped, len(rows), seq_len
        )
    return kept


def _concatenate(documents: list[TokenizedDocument], seq_len: int) -> list[Sequence]:
    input_ids = list(itertools.chain.from_iterable(document.input_ids for document in documents))
    labels = list(itertools.chain.from_iterable(document.labels for document in documents))
    return [
        Sequence(input_ids[start : start + seq_len], labels[start : start + seq_len])
        for start in range(0, len(input_ids), seq_len)
        if len(input_ids) - start >= 2  # a lone last token predicts nothing
    ]


def _truncate(documents: list[TokenizedDocument], seq_len: int) -> list[Sequence]:
    return [Sequence(document.input_ids[:seq_len], document.labels[:seq_len]) for document in documents]


def document_pieces(documents: list[TokenizedDocument], *, seq_len: int) -> list[Sequence]:
    """Each document cut into pieces of at most `seq_len` tokens, in order, each with positions 0..n-1 and its
    first label IGNORE_INDEX: the documents packing="documents" packs into rows.

    A one-token tail predicts nothing and is left out; a piece with no target (an instruction prompt's
    piece) is dropped with a logged warning, before it takes room in a row.
    """
    pieces = []
    for document in documents:
        for start in range(0, len(document.input_ids), seq_len):
            input_ids = document.input_ids[start : start + seq_len]
            if len(input_ids) >= 2:
                labels = [IGNORE_INDEX, *document.labels[start + 1 : start + seq_len]]
                pieces.append(Sequence(input_ids, labels, list(range(len(input_ids)))))
    kept = [piece for piece in pieces if _has_target(piece.labels)]
    if len(kept) < len(pieces) and kept:
        logger.warning("dropped %d of %d document pieces with no target token (prompt longer than seq_len=%d)",
                       len(pieces) - len(kept), len(pieces), seq_len)
    return kept


def _pack_documents(pieces: list[Sequence], seq_len: int) -> list[Sequence]:
    """Best-fit decreasing: each piece, longest first, goes into the fullest row it still fits, else a new row.

    `free` holds (room left, row number) sorted, so the best row is one bisection away. Inside a row the
    pieces are joined in the data's order (sorted by their index), so a row reads as the data did.
    """
    rows: list[list[int]] = []  # piece indices per row
    free: list[tuple[int, int]] = []
    for index in sorted(range(len(pieces)), key=lambda i: -len(pieces[i].input_ids)):
        length = len(pieces[index].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            room, row = seq_len - length, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            room -= length
        if room >= 2:  # a gap of one token would hold no piece
            bisect.insort(free, (room, row))
    return [_join(sorted(members), pieces) for members in rows]


def _join(members: list[int], pieces: list[Sequence]) -> Sequence:
    chosen = [pieces[i] for i in members]
    return Sequence(*(list(itertools.chain.from_iterable(getattr(p, name) for p in chosen))
                      for name in ("input_ids", "labels", "position_ids")))


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
    messages_field: str | None = None,
    response_separator: str = "",
    split: str = "train",
    glob: str = "*.txt",
) -> list[Sequence]:
    """The whole ladder from a data path to rows: `load_records` → `tokenize_records` → `make_sequences`.

    `seq_len=None` keeps every document whole (evaluation of long documents).
    """
    records = load_records(path, text_field=text_field, prompt_field=prompt_field, response_field=response_field,
                           messages_field=messages_field, split=split, glob=glob)
    return sequences_from_records(records, tokenizer, seq_len=seq_len, packing=packing, response_separator=response_separator)


def sequences_from_records(records: list[Record], tokenizer, *, seq_len: int | None, packing: str,
                           response_separator: str = "") -> list[Sequence]:
    """`tokenize_records` → `make_sequences` (`seq_len=None`: every document whole)."""
    documents = tokenize_records(records, tokenizer, response_separator=response_separator)
    if seq_len is None:
        seq_len = max(len(document.input_ids) for document in documents)
    return make_sequences(documents, seq_len=seq_len, packing=packing)


def hold_out(records: list[Record], fraction: float, *, seed: int) -> tuple[list[Record], list[Record]]:
    """Split documents into `(train, held out)`: `fraction` of them (at least one) drawn with `seed`, both parts in
    their original order. Whole documents are held out, so no held-out text is also trained on.

    Raises:
        DataError: fewer than two documents, or a fraction that would hold out all of them.
    """
    count = len(records)
    held = max(1, round(fraction * count))
    if count < 2 or held >= count:
        raise DataError(
            f"cannot hold out {fraction:g} of {count} document{'s' if count != 1 else ''} ({records[0].source}, ...) and "
            "train on the rest; lower the fraction, add documents, or give held-out data of its own (--eval-data)"
        )
    chosen = set(random.Random(seed).sample(range(count), held))
    return [r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen]


def collate(sequences: list[Sequence], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one.

    Returns:
        "input_ids": `[B, T]` long, `pad_token_id` on padding;
        "attention_mask": `[B, T]` long, 1 on real tokens, 0 on padding;
        "labels": `[B, T]` long, IGNORE_INDEX (-100) on padding, so padding is never a target;
        "position_ids": `[B, T]` long, only when a row carries its own (packed documents): each row's, and
            on its padding positions that go on counting from its last document's (a continuation, not a
            restart, so padding opens no document; the mask keeps it out of attention and the loss).
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
    packed = any(sequence.position_ids is not None for sequence in sequences)
    position_ids = torch.arange(width).repeat(batch_size, 1) if packed else None
    for row, sequence in enumerate(sequences):
        length = len(sequence.input_ids)
        input_ids[row, :length] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(sequence.labels, dtype=torch.long)
        if packed and sequence.position_ids is not None:
            last = sequence.position_ids[-1]
            position_ids[row] = torch.tensor(sequence.position_ids + list(range(last + 1, last + 1 + width - length)))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch if position_ids is None else {**batch, "position_ids": position_ids}


# ----- the synthetic long-range task -----


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any id works), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
