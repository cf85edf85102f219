"""Tokenizers the tests build themselves (no download), and what is built on them.

* `word_tokenizer`: word level over w0..w99 (`WORDS`); `random_text` writes text in those words; the
  `model_dir` fixture is a tiny Llama saved with it, as a user's model folder (test_train, test_heldout).
* `bpe_tokenizer`: a toy byte-level BPE trained on English sentences (test_probes, docs/probes.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chunkwise.data.probes import English
from chunkwise.models.presets import build_tiny_model

WORDS = [f"w{i}" for i in range(100)]


def word_tokenizer():
    """A word-level tokenizer over w0..w99 (ids below tiny-llama's vocabulary of 128) that adds <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, with its tokenizer: what a user's local model folder looks like."""
    folder = tmp_path_factory.mktemp("model")
    build_tiny_model("tiny-llama", seed=0).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def bpe_tokenizer():
    """A byte-level BPE tokenizer (as GPT-2's, at toy size) trained here on English sentences; vocabulary < 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [English.INSTRUCTION, English.FILLER, *English.SUBJECTS, *English.VERBS, *English.OBJECTS, *English.TIMES,
              "The pass key is 12345. What is the special magic number for amber-otter mentioned in the provided text?"]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    core.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
