"""Long-document evaluation: loss, perplexity and next-token accuracy by chunked, no-grad inference.

A document is read chunk by chunk through a KV cache, like generation's prefill cut into pieces: the
activations alive at any time are one chunk's, so a document far longer than one full-attention
forward fits in memory; only the KV cache grows with its length. Same conventions as training:
labels shifted once over the whole document, chunk [s, e) at positions s..e-1, the attention mask
sliced to [0, e).

    chunkwise eval --model runs/demo                       # the synthetic task's accuracy, held-out data
    chunkwise eval --model runs/mine --data book.txt --chunk-size 2048
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .cache import ChunkCache
from .generate import forward_chunk
from .loss import IGNORE_INDEX, chunk_loss_sum, shift_labels
from .models import CausalLMHandle, inspect_causal_lm


# ----- scoring ---------------------------------------------------------------------------------------


@dataclass
class TokenScores:
    """Sums over scored target tokens; add them up across batches."""

    loss_sum: float = 0.0
    num_targets: int = 0
    num_correct: int = 0

    def __add__(self, other: TokenScores) -> TokenScores:
        return TokenScores(
            self.loss_sum + other.loss_sum, self.num_targets + other.num_targets, self.num_correct + other.num_correct
        )

    @property
    def loss(self) -> float:
        """Mean cross-entropy per target token, in nats."""
        return self.loss_sum / self.num_targets if self.num_targets else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def accuracy(self) -> float:
        """Fraction of targets whose most likely next token (argmax) is right."""
        return self.num_correct / self.num_targets if self.num_targets else float("nan")


def chunked_logits(handle: CausalLMHandle, inputs: dict, attention_mask: torch.Tensor | None, *, chunk_size: int):
    """Yield `(start, end, logits [B, c, V])` for chunk after chunk of `inputs` (run without autograd by the caller).

    Args:
        inputs: `{"input_ids": [B, T]}` or `{"inputs_embeds": [B, T, H]}`.
        attention_mask: `[B, T]` (1 = token, 0 = right padding), or None.
    """
    name, tokens = next(iter(inputs.items()))
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the model's plain causal mask, as the engine does
    seq_len = tokens.shape[1]
    # The training cache in record mode: each chunk's KV is written once into a buffer sized for the
    # whole document, and attention reads views (transformers' DynamicCache would re-concatenate the
    # whole past for every chunk).
    cache = ChunkCache(total_length=seq_len)
    for number, start in enumerate(range(0, seq_len, chunk_size)):
        end = min(start + chunk_size, seq_len)
        logits = forward_chunk(handle, cache, {name: tokens[:, start:end]}, number=number, start=start,
                               attention_mask=None if attention_mask is None else attention_mask[:, :end])
        yield start, end, logits


def _chunks(handle: CausalLMHandle, batch: dict, chunk_size: int):
    """Yield `(logits [B, c, V], targets [B, c])` chunk by chunk, without autograd."""
    name = "input_ids" if "input_ids" in batch else "inputs_embeds"
    targets = shift_labels(batch["labels"])
    for start, end, logits in chunked_logits(handle, {name: batch[name]}, batch.get("attention_mask"), chunk_size=chunk_size):
        yield logits, targets[:, start:end]


@torch.no_grad()
def chunked_loss_sum(handle: CausalLMHandle, batch: dict, *, chunk_size: int) -> torch.Tensor:
    """Summed token loss of a batch, run chunk by chunk through a `ChunkCache` (record mode) without autograd.

    Equals the sum of a full-sequence forward's token losses (up to float rounding).

    Args:
        handle: the model, as `inspect_causal_lm` describes it.
        batch: `input_ids` `[B, T]` or `inputs_embeds` `[B, T, H]`, `labels` `[B, T]`, optional
            `attention_mask` `[B, T]` (1 = token, 0 = right padding).
    Returns:
        A scalar: the sum of the cross-entropy over the valid targets (float32 for half-precision models).
    """
    total = None
    for logits, targets in _chunks(handle, batch, chunk_size):
        chunk = chunk_loss_sum(logits, targets)
        total = chunk if total is None else total + chunk
    return total


@torch.no_grad()
def score_batch(handle: CausalLMHandle, batch: dict, *, chunk_size: int) -> TokenScores:
    """Loss sum, target count and argmax-correct count of a batch, chunk by chunk (see `chunked_loss_sum`)."""
    scores = TokenScores()
    for logits, targets in _chunks(handle, batch, chunk_size):
        valid = targets != IGNORE_INDEX
        correct = int((logits.argmax(-1)[valid] == targets[valid]).sum())
        scores = scores + TokenScores(float(chunk_loss_sum(logits, targets)), int(valid.sum()), correct)
    return scores


def score_batches(handle: CausalLMHandle, batches: list[dict], *, chunk_size: int, device: torch.device, autocast_dtype=None) -> tuple[TokenScores, int]:
    """Scores summed over collated batches (moved to `device`, under autocast if given), and the tokens read."""
    scores, tokens = TokenScores(), 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scores = scores + score_batch(handle, batch, chunk_size=chunk_size)
        tokens += int(batch["attention_mask"].sum())
    return scores, tokens


# ----- the `chunkwise eval` recipe --------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Settings of `chunkwise eval` (the CLI flags map one to one)."""

    model: str
    """A run directory, a model or adapter folder, a hub id, or a tiny preset."""
    data: str | None = None
    """Documents to score (as `chunkwise train --data`); default: the run's data, else the synthetic task."""
    seq_len: int | None = None
    """Synthetic task: tokens per sequence (default: the run's). Files: score at most this many tokens of
    each document (default: whole documents)."""
    chunk_size: int = 1024
    """Tokens per inference chunk; peak activation memory is that of one chunk."""
    batch_size: int = 1
    num_sequences: int = 32
    """Synthetic task: held-out sequences to score."""
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    split: str = "train"
    allow_extrapolation: bool = False
    """Score documents longer than the model's position limit (with a warning) instead of refusing."""


@dataclass
class EvalReport:
    model: str
    data: str
    documents: int
    tokens: int
    longest_document: int
    targets: int
    loss: float
    perplexity: float
    accuracy: float
    chance_accuracy: float | None
    peak_memory_bytes: int
    seconds: float
    tokens_per_s: float
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(config: EvalConfig, *, log=print) -> EvalReport:
    """Score `config.data` with `config.model` chunk by chunk; see the module docstring."""
    from .data import SYNTHETIC, collate, held_out_batches, pad_token_id, read_sequences, synthetic_task_for
    from .models import check_position_limit, resolve_device, training_dtypes
    from .reporting import peak_memory_bytes
    from .run import load_trained_model

    if config.chunk_size < 1 or config.batch_size < 1:
        raise ValueError("--chunk-size and --batch-size must be positive integers")
    device = resolve_device(config.device)
    weights_dtype, autocast_dtype = training_dtypes(config.dtype, device)
    model, tokenizer, settings = load_trained_model(config.model, dtype=weights_dtype)
    model.to(device).eval()
    handle = inspect_causal_lm(model)
    data = config.data or (settings or {}).get("data") or SYNTHETIC

    chance = None
    if data == SYNTHETIC:
        task = synthetic_task_for(handle.vocab_size)
        seq_len = config.seq_len or (settings or {}).get("seq_len") or 2048
        batches = held_out_batches(task, num_sequences=config.num_sequences, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed)
        chance = task.chance_accuracy
        documents = len(batches) * config.batch_size
    else:
        if tokenizer is None:
            raise ValueError(f"{config.model} has no tokenizer to read {data}; evaluate a folder saved with its tokenizer")
        sequences = read_sequences(
            data, tokenizer, seq_len=config.seq_len, packing="truncate", text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, split=config.split,
        )
        pad = pad_token_id(tokenizer)
        batches = [
            collate(sequences[i : i + config.batch_size], pad_token_id=pad)
            for i in range(0, len(sequences), config.batch_size)
        ]
        documents = len(sequences)
    longest = max(b["input_ids"].shape[1] for b in batches)
    check_position_limit(handle.lm.config, longest, allow=config.allow_extrapolation, option="document length", log=log)

    start = time.perf_counter()
    scores, tokens = score_batches(handle, batches, chunk_size=config.chunk_size, device=device, autocast_dtype=autocast_dtype)
    seconds = time.perf_counter() - start
    return EvalReport(
        model=config.model, data=data, documents=documents, tokens=tokens, longest_document=longest,
        targets=scores.num_targets, loss=scores.loss, perplexity=scores.perplexity, accuracy=scores.accuracy,
        chance_accuracy=chance, peak_memory_bytes=peak_memory_bytes(device), seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
        settings={"chunk_size": config.chunk_size, "dtype": config.dtype, "device": str(device)},
    )
