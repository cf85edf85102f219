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

import time
from dataclasses import asdict, dataclass, field

from chunkwise.data.names import PAIR_DEPTHS


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
    pair_depth: str | None = None
    """Synthetic task: where the key→value pairs sit, "start" or "random" (default: the run's, else start)."""
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    """Conversations: the field with the turns (default: the run's; a "messages" field is found without it)."""
    response_separator: str | None = None
    """Instruction data: text between prompt and response (default: the run's, else none)."""
    glob: str | None = None
    """Files read from a --data folder (default: the run's, else *.txt)."""
    split: str = "train"
    allow_extrapolation: bool = False
    """Score documents longer than the model's position limit (with a warning) instead of refusing."""
    load_in_4bit: bool = False
    """Load the base quantized to 4 bits (bitsandbytes); default: as the run was trained (a run directory)."""
    load_in_8bit: bool = False
    """Load the base quantized to 8 bits (bitsandbytes); default: as the run was trained."""
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: str | None = None
    """What a 4-bit layer computes in; default: --dtype's."""

    def quantization(self):
        """The `Quantization` asked for, or None (then the run's own)."""
        from chunkwise.models.quantize import QUANTIZATION_FIELDS, Quantization

        asked = Quantization(**{name: getattr(self, name) for name in QUANTIZATION_FIELDS})
        return asked if asked.enabled else None


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


def check_settings(config: EvalConfig) -> None:
    """The plain settings and the model's path, checked before torch loads (`chunkwise eval` answers a mistake at once)."""
    from chunkwise.recipes.run import check_model_argument

    if config.chunk_size < 1 or config.batch_size < 1:
        raise ValueError("--chunk-size and --batch-size must be positive integers")
    if config.pair_depth is not None and config.pair_depth not in PAIR_DEPTHS:
        raise ValueError(f"--pair-depth must be one of {', '.join(PAIR_DEPTHS)}, got {config.pair_depth!r}")
    check_model_argument(config.model)


def evaluate(config: EvalConfig, *, log=print) -> EvalReport:
    """Score `config.data` with `config.model` chunk by chunk; see the module docstring."""
    check_settings(config)
    from chunkwise.core.handle import inspect_causal_lm, unwrap_causal_lm
    from chunkwise.core.inference import score_batches
    from chunkwise.core.quantized import is_quantized
    from chunkwise.data.sequences import collate, pad_token_id, read_sequences
    from chunkwise.data.synthetic import SYNTHETIC, held_out_batches, synthetic_task_for
    from chunkwise.models.loading import check_position_limit
    from chunkwise.recipes.run import load_trained_model
    from chunkwise.utils.memory import peak_memory_bytes
    from chunkwise.utils.precision import resolve_device, training_dtypes
    device = resolve_device(config.device)
    weights_dtype, autocast_dtype = training_dtypes(config.dtype, device)
    quantization = config.quantization()
    compute = None if quantization is None else quantization.compute_dtype(weights_dtype, autocast_dtype)
    model, tokenizer, settings = load_trained_model(config.model, dtype=weights_dtype, quantization=quantization,
                                                    compute_dtype=compute, device=device)
    if not is_quantized(unwrap_causal_lm(model)):  # a quantized model was loaded onto the device and cannot move
        model.to(device)
    model.eval()
    handle = inspect_causal_lm(model)
    data = config.data or (settings or {}).get("data") or SYNTHETIC

    chance, described = None, {}
    if data == SYNTHETIC:
        task = synthetic_task_for(handle.vocab_size, config.pair_depth or (settings or {}).get("pair_depth") or "start")
        described = {"pair_depth": task.pair_depth}
        seq_len = config.seq_len or (settings or {}).get("seq_len") or 2048
        batches = held_out_batches(task, num_sequences=config.num_sequences, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed)
        chance = task.chance_accuracy
        documents = len(batches) * config.batch_size
    else:
        if tokenizer is None:
            raise ValueError(f"{config.model} has no tokenizer to read {data}; evaluate a folder saved with its tokenizer")
        run = settings or {}
        sequences = read_sequences(
            data, tokenizer, seq_len=config.seq_len, packing="truncate", text_field=config.text_field,
            prompt_field=config.prompt_field, response_field=config.response_field, split=config.split,
            messages_field=config.messages_field or run.get("messages_field"), glob=config.glob or run.get("glob") or "*.txt",
            response_separator=config.response_separator if config.response_separator is not None else run.get("response_separator", ""),
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
        settings={"chunk_size": config.chunk_size, "dtype": config.dtype, "device": str(device), **described},
    )
