"""The tiny presets' tokenizer: one token per UTF-8 byte, built in code (nothing is downloaded).

It reads any text, in any language, with no training and no vocabulary file, which is what a model trained
from scratch on a user's documents needs (`chunkwise train --model tiny-llama --data folder/`). The price
is length: a token is a byte, so a sequence holds about a quarter of the text a BPE tokenizer's would.

Ids, fixed so that a saved model and this tokenizer always agree:

    0..255   the bytes 0x00..0xFF
    256      <pad>
    257      <bos>          put before every text (the post-processor)
    258      <eos>          appended to every document by the data ladder
    259, 260 <|im_start|>, <|im_end|>   the chat template's turn markers (ChatML's layout)
    261..263 unused, so that the embedding has `BYTE_VOCAB_SIZE` = 264 rows, a multiple of 8

It is a `PreTrainedTokenizerFast` over a `tokenizers` BPE model with no merges on GPT-2's byte-to-character
map, so `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it like any hub tokenizer.
"""

from __future__ import annotations

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>")
BYTE_VOCAB_SIZE = 264
"""Rows of the embedding of a preset that reads text with the byte tokenizer: 256 bytes, 5 specials, 3 unused."""

# ChatML's layout (`<|im_start|>role\ncontent<|im_end|>\n`), so conversations train on the presets offline too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def byte_tokenizer():
    """A new byte-level tokenizer (ids in the module docstring), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {character: byte for byte, character in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    # No regex split and no prefix space: the text's bytes, exactly, one token each.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(BYTE_SPECIALS))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 257)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                        model_max_length=1 << 30)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
