"""The tiny presets' byte tokenizer: every text round-trips, ids are the bytes, and it saves like any tokenizer."""

import pytest

from chunkwise.models.byte_tokenizer import BYTE_SPECIALS, BYTE_VOCAB_SIZE, byte_tokenizer
from chunkwise.models.loading import load_causal_lm, load_tokenizer, preset_text_vocab
from chunkwise.models.presets import TINY_PRESETS


@pytest.mark.parametrize("text", ["plain ASCII, with  two spaces\tand a tab\n", "Grüße — 日本語 🙂", "\x00\x01 control bytes"])
def test_ids_are_the_utf8_bytes_after_bos_and_decode_back(text):
    tokenizer = byte_tokenizer()
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *text.encode("utf-8")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_specials_follow_the_bytes_and_fit_the_preset_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    assert tokenizer.convert_tokens_to_ids(list(BYTE_SPECIALS)) == [256, 257, 258, 259, 260]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    assert len(tokenizer) <= BYTE_VOCAB_SIZE == 264 and BYTE_VOCAB_SIZE % 8 == 0
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("é ü")["input_ids"] == tokenizer("é ü")["input_ids"] and again.chat_template == tokenizer.chat_template


def test_tiny_presets_get_the_byte_tokenizer_and_a_vocabulary_that_holds_it():
    for preset in TINY_PRESETS:
        assert load_tokenizer(preset).eos_token_id == 258
        assert preset_text_vocab(preset) == BYTE_VOCAB_SIZE
    model = load_causal_lm("tiny-qwen3", vocab_size=preset_text_vocab("tiny-qwen3"))
    assert model.get_input_embeddings().weight.shape[0] == BYTE_VOCAB_SIZE
    assert load_causal_lm("tiny-qwen3").config.vocab_size == 128  # without text, the preset is unchanged
