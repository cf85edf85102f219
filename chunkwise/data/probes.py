"""Long-context probes, built with the model's own tokenizer: passkey retrieval and a needle in a haystack.

A probe is a prompt of about `length` tokens that hides one fact (the needle) at a chosen depth of
irrelevant text (the haystack) and asks for it at the end; the model answers if its greedy
continuation starts with the answer (after spaces or punctuation), as a whole word.

* `passkey` (Mohtashami & Jaggi, 2023): a five-digit pass key, stated twice in one sentence, inside a
  repeated filler ("The grass is green. The sky is blue. ...").
* `needle` (after Kamradt's needle-in-a-haystack and RULER's single-needle task): "One of the special
  magic numbers for <key> is: <7 digits>." stated once inside varied sentences, and asked for by its key.

The texts are written in the tokenizer's language (`ProbeLanguage`): English for a tokenizer that
spells English (any BPE, SentencePiece, ... vocabulary), and the synthetic recall task's words for a
tokenizer over that vocabulary (the demo model's): there the needle is a key→value pair (`k5 v9`,
four times for `passkey` as in training, once for `needle`), the haystack filler words (`f3`), and the
question `? k5`.

The whole prompt is assembled as text and tokenized once (as a user's prompt would be), with as many
haystack sentences as fit in `length` tokens minus room for the answer; the needle goes between two
haystack sentences, after `depth` of them (depth 0: right after the instruction, 1: just before the
question).
"""

from __future__ import annotations

import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

PROBE_TASKS = ("passkey", "needle")


@dataclass(frozen=True)
class Probe:
    """One prompt and its answer.

    Attributes:
        task, length, depth: what was asked for (`length` bounds prompt + answer tokens).
        input_ids: the prompt's token ids (its length is `len(input_ids)`; at most `length - max_new_tokens`).
        answer: the text the continuation must start with, as a whole word.
        max_new_tokens: tokens to generate: the answer's length in tokens plus a little slack.
        needle_token: index of the first prompt token at or after the needle's start.
    """

    task: str
    length: int
    depth: float
    input_ids: list[int]
    answer: str
    max_new_tokens: int
    needle_token: int

    def is_answered_by(self, text: str) -> bool:
        """Whether `text` (the decoded continuation) starts with the answer as a whole word, after any spaces
        or punctuation (" 12345." and ": v9" answer; "v17" does not answer "v1", nor "v3 v9" "v9")."""
        return re.match(rf"\W*{re.escape(self.answer)}(?!\w)", text) is not None


@dataclass(frozen=True)
class ProbeText:
    """A probe as text, before tokenization: instruction, haystack (sentences), needle, question."""

    instruction: str
    haystack: list[str]
    needle: str
    question: str
    answer: str


# ----- the languages probes are written in -----------------------------------------------------------


class ProbeLanguage(ABC):
    """Writes probe texts in one tokenizer's language."""

    name = ""

    @abstractmethod
    def fits(self, tokenizer) -> bool:
        """Whether `tokenizer` spells this language (a language may read the words it will use from it)."""

    @abstractmethod
    def text(self, task: str, rng: random.Random, sentences: int) -> ProbeText:
        """A `task` probe with `sentences` haystack sentences; `rng` draws the answer and the sentences."""


def _spells(tokenizer, text: str) -> bool:
    """Whether `tokenizer` encodes `text` without unknown tokens and decodes it back to the same words."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        return False
    return tokenizer.decode(ids, skip_special_tokens=True).split() == text.split()


class English(ProbeLanguage):
    name = "english"
    INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                   "I will quiz you about the important information there.")
    FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    SUBJECTS = ("The old farmer", "A young engineer", "The quiet librarian", "Our neighbour", "The ship's captain",
                "A travelling musician", "The city council", "My grandmother")
    VERBS = ("repaired", "painted", "described", "carried", "found", "sold", "photographed", "measured")
    OBJECTS = ("a wooden bridge", "the red barn", "an old map", "the garden wall", "a bag of apples", "the northern road",
               "a broken clock", "the harbour lights")
    TIMES = ("last spring", "before dawn", "on a rainy Tuesday", "after the market closed", "in the winter of that year",
             "during the long holiday")
    KEYS = ("amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow")
    KEY_NOUNS = ("otter", "lantern", "meadow", "violin", "harbor", "pepper", "comet", "saddle")

    def fits(self, tokenizer) -> bool:
        return _spells(tokenizer, self.INSTRUCTION + self.FILLER + " 0123456789")

    def text(self, task: str, rng: random.Random, sentences: int) -> ProbeText:
        if task == "passkey":
            key = str(rng.randint(10_000, 99_999))
            return ProbeText(self.INSTRUCTION, [self.FILLER] * sentences,
                             f" The pass key is {key}. Remember it. {key} is the pass key.",
                             " What is the pass key? The pass key is", key)
        name = f"{rng.choice(self.KEYS)}-{rng.choice(self.KEY_NOUNS)}"
        number = str(rng.randint(1_000_000, 9_999_999))
        haystack = [f" {rng.choice(self.SUBJECTS)} {rng.choice(self.VERBS)} {rng.choice(self.OBJECTS)} {rng.choice(self.TIMES)}."
                    for _ in range(sentences)]
        question = (f" What is the special magic number for {name} mentioned in the provided text? "
                    f"The special magic number for {name} mentioned in the provided text is")
        return ProbeText(self.INSTRUCTION, haystack, f" One of the special magic numbers for {name} is: {number}.", question, number)


class RecallWords(ProbeLanguage):
    """The synthetic recall task's vocabulary (`data.RecallTask`): `<bos>`, keys `k*`, values `v*`, fillers `f*`, `?`."""

    name = "recall-task words"

    def __init__(self):
        self.keys = self.values = self.fillers = ()

    def fits(self, tokenizer) -> bool:
        vocabulary = tokenizer.get_vocab()
        words = {kind: sorted((w for w in vocabulary if re.fullmatch(rf"{kind}\d+", w)), key=lambda w: int(w[1:]))
                 for kind in "kvf"}
        self.keys, self.values, self.fillers = words["k"], words["v"], words["f"]
        return all(words.values()) and "?" in vocabulary and "<bos>" in vocabulary

    def text(self, task: str, rng: random.Random, sentences: int) -> ProbeText:
        key, value = rng.choice(self.keys), rng.choice(self.values)
        repeats = 4 if task == "passkey" else 1  # the demo trains on pairs stated four times
        return ProbeText("<bos>", [f" {rng.choice(self.fillers)}" for _ in range(sentences)],
                         f" {key} {value}" * repeats, f" ? {key}", value)


LANGUAGES = (English, RecallWords)


def probe_language(tokenizer, model_name: str) -> ProbeLanguage:
    """The first language in `LANGUAGES` the tokenizer spells; a clear error if none."""
    for language in LANGUAGES:
        candidate = language()
        if candidate.fits(tokenizer):
            return candidate
    raise ValueError(f"the tokenizer of {model_name} spells neither English nor the synthetic task's words, so no probe "
                     "can be written with it; probes need a tokenizer that encodes English text without unknown tokens")


# ----- assembling a probe of a given length ------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids as the model reads a prompt: the tokenizer's own special tokens at the start, no EOS at the end."""
    ids = list(tokenizer(text)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id and not text.endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def _assemble(text: ProbeText, sentences: int, depth: float) -> tuple[str, str]:
    """(prompt, the prompt up to the needle) with the first `sentences` haystack sentences."""
    at = round(depth * sentences)
    before = text.instruction + "".join(text.haystack[:at])
    return before + text.needle + "".join(text.haystack[at:sentences]) + text.question, before


def build_probe(tokenizer, language: ProbeLanguage, *, task: str, length: int, depth: float, seed: int) -> Probe:
    """A `task` probe of at most `length` tokens (prompt + answer) with the needle at `depth` (0..1).

    Raises:
        ValueError: unknown task, depth outside [0, 1], or a length too short for the instruction,
            needle and question (the message says how many tokens they need).
    """
    if task not in PROBE_TASKS:
        raise ValueError(f"unknown probe task {task!r}; choose one of {', '.join(PROBE_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1 (a fraction of the haystack), got {depth}")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    sample = language.text(task, random.Random(rng.random()), 64)  # haystack sentences' average length
    answer_tokens = len(tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"])
    max_new_tokens = answer_tokens + 4  # room for a leading space, a colon, ... before the answer
    fixed = len(_encode(tokenizer, _assemble(sample, 0, 0.0)[0]))
    per_sentence = (len(_encode(tokenizer, _assemble(sample, 64, 0.0)[0])) - fixed) / 64
    room = length - max_new_tokens
    if fixed + per_sentence > room:
        raise ValueError(f"a {task} probe needs at least {math.ceil(fixed + per_sentence + max_new_tokens)} tokens with this "
                         f"tokenizer (instruction, needle, question, answer); --seq-len {length} is too short")
    # Draw the text with more sentences than should fit, then find the most that fit by bisection
    # (the prompt is tokenized whole each time: pieces tokenized apart need not add up).
    text = language.text(task, rng, int((room - fixed) / per_sentence * 1.1) + 16)

    def fits(count: int) -> bool:
        return len(_encode(tokenizer, _assemble(text, count, depth)[0])) <= room

    low, high = 0, len(text.haystack)  # fits(low) holds (checked above, up to rounding); find the largest
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    sentences = low
    prompt, before = _assemble(text, sentences, depth)
    ids = _encode(tokenizer, prompt)
    return Probe(task, length, depth, ids, text.answer, max_new_tokens, needle_token=len(_encode(tokenizer, before)))


@dataclass
class ProbeCell:
    """Results of the probes at one (length, depth)."""

    length: int
    depth: float
    correct: int = 0
    total: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    """The decoded continuations, to see what the model said."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")
