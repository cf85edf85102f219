"""Inference over long inputs: one chunk through the KV cache, chunked prefill, greedy decoding.

A ladder of small steps (as gpt-fast's `prefill` → `decode_one_token` → `decode_n_tokens`):

    forward_chunk    one chunk [s, e) through a `ChunkCache` in record mode: its KV is stored, logits returned
    prefill          a whole prompt, chunk by chunk: the logits of its last position
    greedy_generate  prefill, then one token at a time (each a chunk of one) for `max_new_tokens`
    chunked_logits   every chunk's logits in turn; `chunked_loss_sum`, `score_batch` score a batch from them

The cache is the one training uses (`ChunkCache`, record mode): each chunk's keys/values are written
once into a buffer sized for the whole sequence and attention reads views of it, through the engine's
attention (`chunk_attention`). What is alive at any time is the weights, the KV cache (growing with the
length) and one chunk's activations — so a prompt far longer than one forward pass allows fits, in
memory that does not grow with the length beyond the KV cache. The prefill asks the model for the
logits of the chunk's last position only (`logits_to_keep=1`, where the model takes it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from chunkwise.attention.chunk import chunk_attention
from chunkwise.core.batch import mask_document_ends
from chunkwise.core.cache import ChunkCache
from chunkwise.core.documents import find_documents
from chunkwise.core.handle import CausalLMHandle
from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels
from chunkwise.core.quantized import trainable_quantized_layers


def forward_chunk(handle: CausalLMHandle, cache: ChunkCache, inputs: dict, *, number: int, start: int,
                  attention_mask=None, last_logits_only: bool = False, position_ids: torch.Tensor | None = None,
                  first: int = 0) -> torch.Tensor:
    """Run chunk `number`, tokens [start, start + c), through `cache` (record mode) and store its KV.

    Args:
        inputs: `{"input_ids": [B, c]}` or `{"inputs_embeds": [B, c, H]}`.
        attention_mask: `[B, start + c]` (1 = token, 0 = right padding), or None for no padding; for a packed
            row, the per-document mask over keys `[first, start + c)` (`Documents.model_mask`).
        last_logits_only: compute the LM head for the chunk's last position only.
        position_ids: the chunk's `[B, c]` positions (a packed row); default `start..start + c - 1`.
        first: the first key the chunk may read (a packed row; see `ChunkCache.prepare`).
    Returns:
        logits `[B, c, V]`, or `[B, 1, V]` with `last_logits_only` on a model that takes `logits_to_keep`
        (others return every position's).
    """
    (name, tokens), = inputs.items()
    end = start + tokens.shape[1]
    keep = {"logits_to_keep": 1} if last_logits_only and _takes_logits_to_keep(handle) else {}
    cache.prepare(num_past=number, record=True, first=first)
    if position_ids is None:
        position_ids = torch.arange(start, end, device=tokens.device).unsqueeze(0)
    # No repeated KV heads, no float mask (see chunkwise.attention.chunk); and a quantized base keeps its
    # training layout, though this pass runs without grad (see chunkwise.core.quantized).
    with chunk_attention(handle.decoder.config), trainable_quantized_layers(handle.lm):
        logits = handle.lm(
            **{name: tokens, handle.cache_kwarg: cache},
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **keep,
        ).logits
    cache.commit(end - start)
    return logits


def _takes_logits_to_keep(handle: CausalLMHandle) -> bool:
    return "logits_to_keep" in inspect.signature(handle.lm.forward).parameters


def kv_cache_bytes(cache: ChunkCache) -> int:
    """Bytes held by the cache's KV buffers (every layer, keys and values, the whole allocated length)."""
    return sum(buffer.numel() * buffer.element_size() for layer in cache.layers for buffer in layer.stored)


@torch.no_grad()
def prefill(handle: CausalLMHandle, input_ids: torch.Tensor, *, chunk_size: int, cache: ChunkCache) -> torch.Tensor:
    """Read the prompt `input_ids` `[B, T]` chunk by chunk into `cache`; return the last position's logits `[B, V]`."""
    logits = None
    for number, start in enumerate(range(0, input_ids.shape[1], chunk_size)):
        chunk = input_ids[:, start : start + chunk_size]
        logits = forward_chunk(handle, cache, {"input_ids": chunk}, number=number, start=start, last_logits_only=True)
    return logits[:, -1]


@dataclass(frozen=True)
class Generation:
    """What `greedy_generate` returns.

    Attributes:
        tokens: `[B, n]` the generated token ids (n = max_new_tokens).
        kv_cache_bytes: size of the KV cache it filled (prompt and generated tokens).
    """

    tokens: torch.Tensor
    kv_cache_bytes: int


@torch.no_grad()
def greedy_generate(handle: CausalLMHandle, input_ids: torch.Tensor, *, chunk_size: int, max_new_tokens: int) -> Generation:
    """Prefill `input_ids` `[B, T]` (no padding) chunk by chunk, then append the most likely token `max_new_tokens` times."""
    if max_new_tokens < 1 or chunk_size < 1:
        raise ValueError(f"max_new_tokens and chunk_size must be positive, got {max_new_tokens} and {chunk_size}")
    prompt_length = input_ids.shape[1]
    cache = ChunkCache(total_length=prompt_length + max_new_tokens)
    next_token = prefill(handle, input_ids, chunk_size=chunk_size, cache=cache).argmax(-1, keepdim=True)  # [B, 1]
    generated = [next_token]
    for offset in range(max_new_tokens - 1):
        logits = forward_chunk(handle, cache, {"input_ids": next_token}, number=cache.num_chunks, start=prompt_length + offset)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_token)
    return Generation(torch.cat(generated, dim=1), kv_cache_bytes(cache))


# ----- scoring: loss, perplexity, accuracy of long documents, chunk by chunk ---------------------------


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


def chunked_logits(handle: CausalLMHandle, inputs: dict, attention_mask: torch.Tensor | None, *, chunk_size: int,
                   position_ids: torch.Tensor | None = None):
    """Yield `(start, end, logits [B, c, V])` for chunk after chunk of `inputs` (run without autograd by the caller).

    Args:
        inputs: `{"input_ids": [B, T]}` or `{"inputs_embeds": [B, T, H]}`.
        attention_mask: `[B, T]` (1 = token, 0 = right padding), or None.
        position_ids: `[B, T]` positions of packed rows (restarting at 0 per document, `chunkwise.core.documents`):
            each document attends to itself only. Default `0..T-1`.
    """
    name, tokens = next(iter(inputs.items()))
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the model's plain causal mask, as the engine does
    seq_len = tokens.shape[1]
    documents = None
    if position_ids is not None:
        documents = find_documents(position_ids, shape=tokens.shape[:2], attention_mask=attention_mask,
                                   max_positions=getattr(handle.decoder.config, "max_position_embeddings", None))
    # The training cache in record mode: each chunk's KV is written once into a buffer sized for the
    # whole document, and attention reads views (transformers' DynamicCache would re-concatenate the
    # whole past for every chunk).
    cache = ChunkCache(total_length=seq_len)
    for number, start in enumerate(range(0, seq_len, chunk_size)):
        end = min(start + chunk_size, seq_len)
        first, mask = 0, None if attention_mask is None else attention_mask[:, :end]
        if documents is not None:
            first = documents.first_key(start, end)
            mask = documents.model_mask(handle.decoder.config, start, end, first)
        logits = forward_chunk(handle, cache, {name: tokens[:, start:end]}, number=number, start=start, attention_mask=mask,
                               position_ids=None if position_ids is None else position_ids[..., start:end], first=first)
        yield start, end, logits


def _chunks(handle: CausalLMHandle, batch: dict, chunk_size: int):
    """Yield `(logits [B, c, V], targets [B, c])` chunk by chunk, without autograd."""
    name = "input_ids" if "input_ids" in batch else "inputs_embeds"
    targets = shift_labels(batch["labels"])
    position_ids = batch.get("position_ids")
    if position_ids is not None:  # a packed batch: a document's last token predicts nothing, as in training
        documents = find_documents(position_ids, shape=targets.shape, attention_mask=batch.get("attention_mask"), max_positions=None)
        targets = mask_document_ends(targets, documents)
    for start, end, logits in chunked_logits(handle, {name: batch[name]}, batch.get("attention_mask"), chunk_size=chunk_size,
                                             position_ids=position_ids):
        yield logits, targets[:, start:end]


@torch.no_grad()
def chunked_loss_sum(handle: CausalLMHandle, batch: dict, *, chunk_size: int) -> torch.Tensor:
    """Summed token loss of a batch, run chunk by chunk through a `ChunkCache` (record mode) without autograd.

    Equals the sum of a full-sequence forward's token losses (up to float rounding).

    Args:
        handle: the model, as `inspect_causal_lm` describes it.
        batch: `input_ids` `[B, T]` or `inputs_embeds` `[B, T, H]`, `labels` `[B, T]`, optional
            `attention_mask` `[B, T]` (1 = token, 0 = right padding), optional `position_ids` `[B, T]` (packed rows).
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
