"""File data: loading, tokenising, packing/truncating and collating, with exact values and messages.

Every file is written under pytest's `tmp_path`; the tokenizer is a word-level one built in memory
(nothing is downloaded), and `datasets` never reaches the hub (`load_dataset` is faked for hub names).
"""

import json
import logging
import os
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.files import DataError, Record, load_records
from chunkwise.data.sequences import Sequence, TokenizedDocument, collate, make_sequences, tokenize_records

# Word-level vocabulary: "one".."ten" are ids 4..13, so expected ids can be read off the words.
WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "Q:", "A:"]
PAD, UNK, BOS, EOS = 0, 1, 2, 3
ONE, TWO, THREE, FOUR = 4, 5, 6, 7
Q = 14


def build_tokenizer(*, special: bool) -> PreTrainedTokenizerFast:
    """With `special`: BOS added by the post-processor (so add_special_tokens matters) and an EOS token;
    without: no BOS, no EOS."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not special:
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(special=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer(special=False)


@pytest.fixture
def datasets_lib(tmp_path, monkeypatch):
    """The `datasets` module, caching under tmp_path; a hub load fails the test unless a test fakes it."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    real_load_dataset = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        assert path in ("json", "csv", "parquet"), f"test tried to load {path!r} from the hub"
        return real_load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_only)
    return datasets


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return str(path)


def message(excinfo) -> str:
    return str(excinfo.value)


# ----- load_records: text files -----


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("one two\nthree\n", encoding="utf-8")
    assert load_records(str(path)) == [Record(str(path), text="one two\nthree\n")]


def test_txt_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffone two".encode("utf-8"))
    assert load_records(path) == [Record(str(path), text="one two")]  # a Path works as well as a str


def test_txt_directory_sorted_recursive_skipping_empty_and_other_files(tmp_path):
    docs = tmp_path / "docs"
    for relative, text in {
        "b.txt": "two",
        "a.txt": "one",
        "z.txt": "ten",
        "sub/c.txt": "three",
        "sub/deeper/d.TXT": "four",
        "empty.txt": " \n",
        "notes.md": "not a document",
        "data.jsonl": '{"text": "not read"}',
    }.items():
        (docs / relative).parent.mkdir(parents=True, exist_ok=True)
        (docs / relative).write_text(text, encoding="utf-8")
    assert load_records(str(docs)) == [
        Record(str(docs / "a.txt"), text="one"),
        Record(str(docs / "b.txt"), text="two"),
        Record(str(docs / "sub" / "c.txt"), text="three"),
        Record(str(docs / "sub" / "deeper" / "d.TXT"), text="four"),
        Record(str(docs / "z.txt"), text="ten"),
    ]


def test_txt_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"one \xe9 two")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == f"{path} is not UTF-8 text (bad byte at offset 4); convert it to UTF-8 or remove it"


def test_plain_text_with_prompt_fields_is_refused(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("one", encoding="utf-8")
    for target in (path, tmp_path):
        with pytest.raises(DataError) as excinfo:
            load_records(str(target), prompt_field="q", response_field="a")
        assert message(excinfo) == (
            f"{target} is plain text, which has no prompt and response fields; give instruction data as JSONL "
            "or a dataset, or drop prompt_field and response_field"
        )


# ----- load_records: JSONL -----


def test_jsonl_text_skips_blank_lines_and_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "one two", "id": 1}, "", "   ", {"text": "three"}])
    assert load_records(path) == [Record(f"{path}:1", text="one two"), Record(f"{path}:4", text="three")]


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"body": "one", "text": 3}])
    assert load_records(path, text_field="body") == [Record(f"{path}:1", text="one")]


def test_jsonl_prompt_response(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"q": "Q: one", "a": "two", "text": "ignored"}])
    assert load_records(path, prompt_field="q", response_field="a") == [Record(f"{path}:1", prompt="Q: one", response="two")]


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "one"}, '{"text": "two"'])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert message(excinfo) == f"{path}:2 is not valid JSON (Expecting ',' delimiter, column 15); fix or remove the line"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ['["one"]'])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert message(excinfo) == f'{path}:1 is a JSON list, not an object; write each line as an object such as {{"text": "..."}}'


def test_jsonl_missing_field_names_field_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}, "", {"content": "two", "id": 7}])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert message(excinfo) == f"{path}:3 has no field 'text' (its keys: 'content', 'id'); set text_field to the right field or fix the line"


def test_jsonl_missing_response_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"q": "Q: one"}])
    with pytest.raises(DataError) as excinfo:
        load_records(path, prompt_field="q", response_field="a")
    assert message(excinfo) == f"{path}:1 has no field 'a' (its keys: 'q'); set response_field to the right field or fix the line"


def test_jsonl_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": 5}])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert message(excinfo) == f"{path}:1: field 'text' is int, not a string; fix the line"


def test_jsonl_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == f"{path}:2 is not UTF-8 text; convert the file to UTF-8"


def test_only_one_of_prompt_and_response_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"q": "one", "a": "two"}])
    with pytest.raises(DataError) as excinfo:
        load_records(path, prompt_field="q")
    assert message(excinfo) == "instruction data needs both prompt_field and response_field, got only prompt_field='q'; give both, or neither to train on text_field"
    with pytest.raises(DataError, match=r"got only response_field='a'; "):
        load_records(path, response_field="a")


# ----- load_records: missing, empty, unsupported -----


@pytest.mark.parametrize("name", ["data/train.jsonl", "./train", "/no/such/dir", "~/no-such-chunkwise-data", "a/b/c", "docs.TXT", "x.csv", "x.parquet", "x.json"])
def test_missing_local_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_records(name)
    assert message(excinfo) == f"data file {name} does not exist (relative paths start from {os.getcwd()}); check the path"


@pytest.mark.parametrize(
    "filename, content, why",
    [
        ("empty.txt", "", "the file is empty"),
        ("blank.txt", "\n \n", "the file is empty"),
        ("empty.jsonl", "", "the file is empty"),
        ("blank.jsonl", "\n\n  \n", "the file is empty"),
        ("empty.json", "", "the file is empty"),
        ("empty.csv", "", "the file is empty"),
    ],
)
def test_empty_file_has_no_examples(tmp_path, filename, content, why):
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == f"no examples found in {path}: {why}; add examples or check the path"


def test_directory_without_text_files_has_no_examples(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "notes.md").write_text("one", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(tmp_path))
    assert message(excinfo) == f"no examples found in {tmp_path}: it has no non-empty *.txt file; add examples or check the path"


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("one", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == (
        f"{path}: unsupported file type '.md'; use .txt, .jsonl, .json, .csv or .parquet, a directory of .txt "
        "files, or a dataset saved with save_to_disk"
    )


def test_datasets_missing_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text("text\none\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == (
        "reading .json, .csv, .parquet files, saved datasets and hub datasets needs the `datasets` package: "
        "pip install 'chunkwise[datasets]'"
    )
    # .txt and .jsonl never need it.
    assert load_records(write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])) == [Record(f"{tmp_path / 'a.jsonl'}:1", text="one")]


# ----- load_records: through `datasets` -----


def test_json_file_via_datasets(tmp_path, datasets_lib):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "one two", "id": 1}, {"text": "three", "id": 2}]), encoding="utf-8")
    assert load_records(str(path)) == [Record(f"{path}[0]", text="one two"), Record(f"{path}[1]", text="three")]
    assert load_records(str(path), split="train[1:]") == [Record(f"{path}[0]", text="three")]


def test_csv_prompt_response_via_datasets(tmp_path, datasets_lib):
    path = tmp_path / "sft.csv"
    path.write_text("prompt,response\nQ: one,two\nQ: three,four\n", encoding="utf-8")
    assert load_records(str(path), prompt_field="prompt", response_field="response") == [
        Record(f"{path}[0]", prompt="Q: one", response="two"),
        Record(f"{path}[1]", prompt="Q: three", response="four"),
    ]


def test_parquet_via_datasets(tmp_path, datasets_lib):
    path = tmp_path / "data.parquet"
    datasets_lib.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(path))
    assert load_records(str(path)) == [Record(f"{path}[0]", text="one"), Record(f"{path}[1]", text="two")]


def test_dataset_missing_column_lists_columns(tmp_path, datasets_lib):
    path = tmp_path / "sft.csv"
    path.write_text("prompt,response\nQ: one,two\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo) == f"{path} has no column 'text' (its columns: 'prompt', 'response'); set text_field to the right column"


def test_dataset_non_string_value_names_the_row(tmp_path, datasets_lib):
    path = tmp_path / "sft.csv"
    path.write_text("prompt,response\nQ: one,two\nQ: three,\n", encoding="utf-8")  # empty cell -> None
    with pytest.raises(DataError) as excinfo:
        load_records(str(path), prompt_field="prompt", response_field="response")
    assert message(excinfo) == f"{path}[1]: field 'response' is NoneType, not a string; fix the data"


def test_malformed_json_file_gives_the_parser_reason(tmp_path, datasets_lib):
    path = tmp_path / "bad.json"
    path.write_text('{"text": ', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path))
    assert message(excinfo).startswith(f"cannot read {path} as JSON (ArrowInvalid: JSON parse error")
    assert message(excinfo).endswith("; check the file and the split")
    assert "\n" not in message(excinfo)


def test_unknown_split_of_a_data_file(tmp_path, datasets_lib):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "one"}]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(str(path), split="validation")
    assert message(excinfo) == (
        f"cannot read {path} as JSON (ValueError: Unknown split \"validation\". Should be one of ['train'].); check the file and the split"
    )


def test_saved_dataset_directory(tmp_path, datasets_lib):
    path = tmp_path / "saved"
    datasets_lib.Dataset.from_dict({"text": ["one", "two three"], "id": [0, 1]}).save_to_disk(str(path))
    assert load_records(str(path)) == [Record(f"{path}[0]", text="one"), Record(f"{path}[1]", text="two three")]


def test_saved_dataset_dict_picks_the_split(tmp_path, datasets_lib):
    path = tmp_path / "saved"
    datasets_lib.DatasetDict(
        {
            "train": datasets_lib.Dataset.from_dict({"text": ["one"]}),
            "validation": datasets_lib.Dataset.from_dict({"text": ["two", "three"]}),
        }
    ).save_to_disk(str(path))
    assert load_records(str(path)) == [Record(f"{path}[0]", text="one")]
    assert load_records(str(path), split="validation") == [Record(f"{path}[0]", text="two"), Record(f"{path}[1]", text="three")]
    with pytest.raises(DataError) as excinfo:
        load_records(str(path), split="test")
    assert message(excinfo) == f"{path} has no split 'test' (its splits: 'train', 'validation'); choose one of them as the split"


def test_empty_dataset_has_no_examples(tmp_path, monkeypatch, datasets_lib):
    # (A saved dataset with no rows cannot be loaded back by `datasets` itself, so the hub path shows it.)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets_lib, "load_dataset", lambda path, **kwargs: datasets_lib.Dataset.from_dict({"text": []}))
    with pytest.raises(DataError) as excinfo:
        load_records("someone/empty", split="test")
    assert message(excinfo) == "no examples found in someone/empty: its split 'test' has no rows; add examples or check the path"


@pytest.mark.parametrize("name", ["someone/some-dataset", "wikitext"])
def test_hub_name_goes_to_load_dataset(tmp_path, monkeypatch, datasets_lib, name):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets_lib.Dataset.from_dict({"text": ["one two"]})

    monkeypatch.setattr(datasets_lib, "load_dataset", fake_load_dataset)
    assert load_records(name, split="validation") == [Record(f"{name}[0]", text="one two")]
    assert calls == [(name, {"split": "validation"})]


def test_hub_failure_is_one_line_with_the_reason(tmp_path, monkeypatch, datasets_lib):
    monkeypatch.chdir(tmp_path)

    def offline(path, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face hub\nsecond line of details")

    monkeypatch.setattr(datasets_lib, "load_dataset", offline)
    with pytest.raises(DataError) as excinfo:
        load_records("someone/some-dataset")
    assert message(excinfo) == (
        "someone/some-dataset does not exist locally and could not be loaded from the Hugging Face hub "
        "(ConnectionError: Couldn't reach the Hugging Face hub); check the path or the dataset name"
    )


# ----- Record -----


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prompt": "p"}, {"response": "r"}, {"text": "t", "prompt": "p", "response": "r"}],
)
def test_record_needs_text_or_prompt_and_response(kwargs):
    with pytest.raises(ValueError, match=r"^Record x.jsonl:1: give either text, or both prompt and response$"):
        Record("x.jsonl:1", **kwargs)


# ----- tokenize_records -----


def test_tokenize_text_adds_bos_and_eos(tokenizer):
    records = [Record("a.txt", text="one two three"), Record("b.txt", text="four <eos>")]
    assert tokenize_records(records, tokenizer) == [
        TokenizedDocument("a.txt", [BOS, ONE, TWO, THREE, EOS], [BOS, ONE, TWO, THREE, EOS]),
        TokenizedDocument("b.txt", [BOS, FOUR, EOS], [BOS, FOUR, EOS]),  # EOS already last: not doubled
    ]


def test_tokenize_text_without_special_tokens(plain_tokenizer):
    assert tokenize_records([Record("a.txt", text="one two")], plain_tokenizer) == [TokenizedDocument("a.txt", [ONE, TWO], [ONE, TWO])]


def test_tokenize_prompt_response(tokenizer):
    records = [Record("sft.jsonl:1", prompt="Q: one two", response="three four")]
    # BOS comes with the prompt only; the response is tokenised without special tokens and ends in EOS.
    assert tokenize_records(records, tokenizer) == [
        TokenizedDocument(
            "sft.jsonl:1",
            [BOS, Q, ONE, TWO, THREE, FOUR, EOS],
            [IGNORE_INDEX] * 4 + [THREE, FOUR, EOS],
        )
    ]


def test_empty_response_with_eos_still_has_a_target(tokenizer):
    assert tokenize_records([Record("s", prompt="Q: one", response="")], tokenizer) == [
        TokenizedDocument("s", [BOS, Q, ONE, EOS], [IGNORE_INDEX] * 3 + [EOS])
    ]


def test_empty_response_without_eos_is_refused(plain_tokenizer):
    with pytest.raises(DataError) as excinfo:
        tokenize_records([Record("sft.jsonl:4", prompt="Q: one", response="")], plain_tokenizer)
    assert message(excinfo) == (
        "sft.jsonl:4 has no target token: its response is empty and the tokenizer has no EOS token; "
        "remove it or give it a response"
    )


def test_one_token_document_is_refused(plain_tokenizer):
    records = [Record("docs/fine.txt", text="one two"), Record("docs/short.txt", text="one")]
    with pytest.raises(DataError) as excinfo:
        tokenize_records(records, plain_tokenizer)
    assert message(excinfo) == (
        "docs/short.txt has 1 token; every document needs at least two (one token predicts the next): "
        "remove it or fix the data"
    )


@pytest.mark.parametrize("text", ["", " \n "])
def test_empty_text_is_refused_even_with_bos_and_eos(tokenizer, text):
    with pytest.raises(DataError) as excinfo:
        tokenize_records([Record("train.jsonl:2", text=text)], tokenizer)
    assert message(excinfo) == (
        "train.jsonl:2 is empty; every document needs at least two tokens (one token predicts the next): "
        "remove it or fix the data"
    )


def test_load_and_tokenize_jsonl_instruction_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: one", "response": "two three"}])
    documents = tokenize_records(load_records(path, prompt_field="prompt", response_field="response"), tokenizer)
    assert documents == [TokenizedDocument(f"{path}:1", [BOS, Q, ONE, TWO, THREE, EOS], [-100, -100, -100, TWO, THREE, EOS])]


# ----- make_sequences -----

# Two documents: plain text (5 tokens), then instruction data (2 prompt tokens, 1 response token).
DOCUMENTS = [
    TokenizedDocument("a", [10, 11, 12, 13, 14], [10, 11, 12, 13, 14]),
    TokenizedDocument("b", [20, 21, 22], [-100, -100, 22]),
]


def test_concat_concatenates_and_cuts_keeping_a_partial_block():
    assert make_sequences(DOCUMENTS, seq_len=3, packing="concat") == [
        Sequence([10, 11, 12], [10, 11, 12]),
        Sequence([13, 14, 20], [13, 14, -100]),
        Sequence([21, 22], [-100, 22]),
    ]


def test_concat_drops_a_one_token_tail(caplog):
    with caplog.at_level(logging.WARNING, logger="chunkwise.data"):
        sequences = make_sequences(DOCUMENTS, seq_len=7, packing="concat")
    assert sequences == [Sequence([10, 11, 12, 13, 14, 20, 21], [10, 11, 12, 13, 14, -100, -100])]
    assert caplog.messages == []  # too short to be a sequence at all, not a dropped one


def test_truncate_keeps_each_document_start():
    assert make_sequences(DOCUMENTS, seq_len=3, packing="truncate") == [
        Sequence([10, 11, 12], [10, 11, 12]),
        Sequence([20, 21, 22], [-100, -100, 22]),
    ]
    assert make_sequences(DOCUMENTS, seq_len=100, packing="truncate") == [
        Sequence([10, 11, 12, 13, 14], [10, 11, 12, 13, 14]),
        Sequence([20, 21, 22], [-100, -100, 22]),
    ]


def test_sequences_without_a_target_after_the_shift_are_dropped(caplog):
    documents = [
        TokenizedDocument("x", [1, 2, 3, 4], [-100, -100, -100, 4]),
        TokenizedDocument("y", [5, 6], [5, -100]),  # its only target is token 0, which nothing predicts
        TokenizedDocument("z", [7, 8], [7, 8]),
    ]
    with caplog.at_level(logging.WARNING, logger="chunkwise.data"):
        sequences = make_sequences(documents, seq_len=2, packing="concat")
    assert sequences == [Sequence([3, 4], [-100, 4]), Sequence([7, 8], [7, 8])]
    assert caplog.messages == ["dropped 2 of 4 sequences with no target token (prompt longer than seq_len=2)"]
    # Truncated to 2 tokens, the instruction example keeps only prompt tokens and is dropped.
    assert make_sequences(documents, seq_len=2, packing="truncate") == [Sequence([7, 8], [7, 8])]


def test_no_sequence_with_a_target_left():
    with pytest.raises(DataError) as excinfo:
        make_sequences([DOCUMENTS[1]], seq_len=2, packing="truncate")
    assert message(excinfo) == (
        "none of the 1 sequences of at most 2 tokens has a target token (prompts longer than seq_len leave no "
        "response tokens); raise seq_len or shorten the prompts"
    )
    with pytest.raises(DataError, match=r"^no documents to make training sequences from; check the data path$"):
        make_sequences([], seq_len=2, packing="pack")


@pytest.mark.parametrize("seq_len", [1, 0, -4, 2.0, "8", True, None])
def test_seq_len_must_be_an_integer_of_at_least_two(seq_len):
    with pytest.raises(ValueError, match=r"^seq_len must be an integer >= 2 \(one token predicts the next\), got "):
        make_sequences(DOCUMENTS, seq_len=seq_len, packing="pack")


def test_pack_is_the_old_name_of_concat():
    for seq_len in (3, 7):
        assert make_sequences(DOCUMENTS, seq_len=seq_len, packing="pack") == make_sequences(DOCUMENTS, seq_len=seq_len, packing="concat")


# Documents of 5, 3 and 2 tokens (the third a text whose tokens are all targets).
THREE_DOCUMENTS = [*DOCUMENTS, TokenizedDocument("c", [30, 31], [30, 31])]


def test_documents_keeps_whole_documents_apart_with_restarting_positions():
    # Best fit, longest first: 5 opens a row, 3 fills it, 2 opens the next; inside a row the data's order.
    assert make_sequences(THREE_DOCUMENTS, seq_len=8, packing="documents") == [
        Sequence([10, 11, 12, 13, 14, 20, 21, 22], [-100, 11, 12, 13, 14, -100, -100, 22], [0, 1, 2, 3, 4, 0, 1, 2]),
        Sequence([30, 31], [-100, 31], [0, 1]),
    ]
    # The two short documents share a row; the long one fills its own (the first label of each document is
    # never a target: the previous document's last token must not learn to predict it).
    assert make_sequences(THREE_DOCUMENTS, seq_len=6, packing="documents") == [
        Sequence([10, 11, 12, 13, 14], [-100, 11, 12, 13, 14], [0, 1, 2, 3, 4]),
        Sequence([20, 21, 22, 30, 31], [-100, -100, 22, -100, 31], [0, 1, 2, 0, 1]),
    ]


def test_documents_cuts_a_long_document_into_pieces_that_restart():
    # seq_len 3: the 5-token document becomes pieces of 3 and 2 tokens, each a document from position 0.
    assert make_sequences(THREE_DOCUMENTS, seq_len=3, packing="documents") == [
        Sequence([10, 11, 12], [-100, 11, 12], [0, 1, 2]),
        Sequence([20, 21, 22], [-100, -100, 22], [0, 1, 2]),
        Sequence([13, 14], [-100, 14], [0, 1]),
        Sequence([30, 31], [-100, 31], [0, 1]),
    ]
    # seq_len 4: the piece [14] of one token predicts nothing and is left out.
    assert make_sequences(DOCUMENTS[:1], seq_len=4, packing="documents") == [Sequence([10, 11, 12, 13], [-100, 11, 12, 13], [0, 1, 2, 3])]


def test_documents_drops_pieces_without_a_target(caplog):
    prompt_only = TokenizedDocument("p", [1, 2, 3, 4, 5], [-100, -100, -100, 4, 5])
    with caplog.at_level(logging.WARNING, logger="chunkwise.data"):
        rows = make_sequences([prompt_only, THREE_DOCUMENTS[2]], seq_len=3, packing="documents")
    # The prompt's first piece [1, 2, 3] has no target and takes no room; two 2-token pieces do not share a 3-token row.
    assert rows == [Sequence([4, 5], [-100, 5], [0, 1]), Sequence([30, 31], [-100, 31], [0, 1])]
    assert caplog.messages == ["dropped 1 of 3 document pieces with no target token (prompt longer than seq_len=3)"]


def test_unknown_packing():
    with pytest.raises(ValueError) as excinfo:
        make_sequences(DOCUMENTS, seq_len=4, packing="pad")
    assert message(excinfo) == "packing must be one of 'documents', 'concat', 'truncate', got 'pad'"
    assert not isinstance(excinfo.value, DataError)  # a caller's mistake, not bad data


# ----- collate -----


def test_collate_right_pads_with_mask_and_ignored_labels():
    batch = collate([Sequence([1, 2, 3], [-100, 2, 3]), Sequence([4, 5], [4, 5])], pad_token_id=PAD)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 5, PAD]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 2, 3], [4, 5, -100]]))


def test_collate_gives_packed_rows_their_positions_and_padding_continues_them():
    batch = collate(make_sequences(THREE_DOCUMENTS, seq_len=8, packing="documents"), pad_token_id=PAD)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "position_ids"]
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]]))
    assert torch.equal(batch["attention_mask"][1], torch.tensor([1, 1, 0, 0, 0, 0, 0, 0]))
    assert batch["position_ids"].dtype == torch.long
    # Rows of one stream carry no positions: the engine counts 0..T-1.
    assert "position_ids" not in collate(make_sequences(THREE_DOCUMENTS, seq_len=8, packing="concat"), pad_token_id=PAD)


def test_collate_pads_with_the_given_id_and_checks_it():
    batch = collate([Sequence([1, 2], [1, 2]), Sequence([3, 4, 5, 6], [3, 4, 5, 6])], pad_token_id=EOS)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, EOS, EOS], [3, 4, 5, 6]]))
    with pytest.raises(ValueError, match=r"^pad_token_id must be a token id \(int\), got None; "):
        collate([Sequence([1, 2], [1, 2])], pad_token_id=None)
    with pytest.raises(ValueError, match=r"^collate needs at least one sequence$"):
        collate([], pad_token_id=PAD)


def test_end_to_end_txt_to_batch(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one two three", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four", encoding="utf-8")
    documents = tokenize_records(load_records(str(tmp_path)), tokenizer)
    batch = collate(make_sequences(documents, seq_len=4, packing="truncate"), pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], torch.tensor([[BOS, ONE, TWO, THREE], [BOS, FOUR, EOS, PAD]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[BOS, ONE, TWO, THREE], [BOS, FOUR, EOS, -100]]))
