"""Conversations: rendered with the chat template, targets exactly the assistant turns' tokens; bad templates refused."""

import json

import pytest
from tokenizer_fixtures import word_tokenizer

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.files import DataError, Record, load_records
from chunkwise.data.sequences import tokenize_records
from chunkwise.models.byte_tokenizer import byte_tokenizer

CONVERSATION = (
    {"role": "system", "content": "Answer in digits."},
    {"role": "user", "content": "Two plus two?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times ten?"},
    {"role": "assistant", "content": "40"},
)


def _split(tokenizer, document):
    """(the target tokens, decoded; the context tokens, decoded)."""
    targets = [i for i, label in zip(document.input_ids, document.labels) if label != IGNORE_INDEX]
    context = [i for i, label in zip(document.input_ids, document.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(targets), tokenizer.decode(context)


def test_only_the_assistant_turns_are_targets():
    tokenizer = byte_tokenizer()
    (document,) = tokenize_records([Record("chat:1", messages=CONVERSATION)], tokenizer)
    assert document.input_ids == tokenizer(tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False),
                                           add_special_tokens=False)["input_ids"]
    targets, context = _split(tokenizer, document)
    assert targets == "4<|im_end|>\n40<|im_end|>\n"  # each answer and the template's end of its turn
    assert "Two plus two?" in context and context.endswith("<|im_start|>assistant\n")  # the turn's header is context
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(document.input_ids, document.labels))


def test_a_jsonl_row_with_messages_is_a_conversation_without_being_told(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": list(CONVERSATION), "id": 7}) + "\n")
    (record,) = load_records(str(path))
    assert record.is_conversation and record.messages == CONVERSATION
    path.write_text(json.dumps({"turns": list(CONVERSATION)}) + "\n")
    assert load_records(str(path), messages_field="turns")[0].messages == CONVERSATION


@pytest.mark.parametrize("messages, expected", [
    ([], "non-empty list"),
    ([{"role": "user"}], "turn 1 of 'messages' is not"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
])
def test_malformed_conversations_are_one_line_errors(tmp_path, messages, expected):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=expected) as error:
        load_records(str(path))
    assert f"{path}:1" in str(error.value) and "\n" not in str(error.value)


def test_a_tokenizer_without_a_chat_template_is_refused_with_the_way_out():
    with pytest.raises(DataError, match="has none; use a model whose tokenizer has one.*--prompt-field"):
        tokenize_records([Record("chat:1", messages=CONVERSATION)], word_tokenizer())


def test_a_template_that_rewrites_earlier_turns_is_refused_not_mislabelled():
    tokenizer = byte_tokenizer()
    # A header that counts the turns changes the tokens before every assistant turn once more turns follow.
    tokenizer.chat_template = "{{ messages|length }} turns\n" + tokenizer.chat_template
    with pytest.raises(DataError, match="renders the turns before turn 3 \\(an assistant turn\\) differently"):
        tokenize_records([Record("chat:1", messages=CONVERSATION)], tokenizer)


def test_the_response_separator_is_context_between_prompt_and_response():
    tokenizer = byte_tokenizer()
    record = Record("qa:1", prompt="Q: two plus two?", response="4")
    (joined,) = tokenize_records([record], tokenizer)
    (separated,) = tokenize_records([record], tokenizer, response_separator="\nA: ")
    assert _split(tokenizer, joined) == ("4<eos>", "<bos>Q: two plus two?")
    assert _split(tokenizer, separated) == ("4<eos>", "<bos>Q: two plus two?\nA: ")
