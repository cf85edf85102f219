"""Conversations (TRL's conversational format) as tokens, with the loss on the assistant turns only.

A conversation is a list of `{"role": ..., "content": ...}` turns. It is rendered with the tokenizer's own chat
template, so the model sees exactly the layout it will be prompted with, and only the tokens each assistant
turn adds (its content and whatever the template closes the turn with, e.g. `<|im_end|>`) are targets; the
system and user turns and the header that opens an assistant turn (`add_generation_prompt`'s text) are context.

How the assistant tokens are found: the conversation is rendered prefix by prefix. Assistant turn k spans the
tokens from the end of `messages[:k]` rendered with the generation prompt to the end of `messages[:k + 1]`.
transformers' own `return_assistant_tokens_mask=True` needs `{% generation %}` markers that most published
templates lack; rendering prefixes works with any template that renders a conversation's earlier turns the same
whatever follows them, and that is checked token by token: a template that rewrites earlier turns (some drop
the reasoning of earlier assistant turns), or a tokenization that merges across a turn boundary, is refused with
the turn that broke it rather than trained on a shifted mask.
"""

from __future__ import annotations

from chunkwise.core.loss import IGNORE_INDEX
from chunkwise.data.files import DataError


def check_chat_template(tokenizer, source: str) -> None:
    """DataError unless `tokenizer` has a chat template (conversations are rendered with it, nothing else)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source} is a conversation, which is rendered with the tokenizer's chat template, and this tokenizer has "
            "none; use a model whose tokenizer has one (an instruct model's, or a tiny preset's byte tokenizer), or give "
            "the data as --prompt-field / --response-field"
        )


def conversation_tokens(tokenizer, messages: tuple[dict, ...], source: str) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of one conversation: the whole rendering, labels -100 except on assistant tokens.

    Raises:
        DataError: no chat template, a template that fails on the conversation, or one whose renderings of
            the conversation's prefixes are not prefixes of the whole (the module docstring says why).
    """
    check_chat_template(tokenizer, source)
    full = _render(tokenizer, messages, generation=False, source=source)
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, messages[:turn], full, generation=True, source=source, turn=turn))
        end = len(_prefix(tokenizer, messages[: turn + 1], full, generation=False, source=source, turn=turn))
        labels[start:end] = full[start:end]
    return full, labels


def _render(tokenizer, messages, *, generation: bool, source: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    except Exception as error:  # a template's own exception (jinja's, or one it raises on a bad role order)
        raise DataError(f"{source}: the tokenizer's chat template fails on this conversation ({error}); fix the turns") from error
    # The template writes the special tokens it wants (BOS included), as apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix(tokenizer, messages, full: list[int], *, generation: bool, source: str, turn: int) -> list[int]:
    """The rendering of `messages` (the first turns), checked to be the start of the whole conversation's."""
    ids = _render(tokenizer, messages, generation=generation, source=source)
    if full[: len(ids)] != ids:
        raise DataError(
            f"{source}: the chat template renders the turns before turn {turn + 1} (an assistant turn) differently once later turns "
            "follow (or their tokens merge across the boundary), so the assistant's tokens cannot be marked; use a template "
            "that leaves earlier turns as they are, or give the data as --prompt-field / --response-field"
        )
    return ids
