"""The training recipe behind `chunkwise train`: set up → train → save, with checkpoints and resume.

    config = TrainConfig(model="meta-llama/Llama-3.2-1B", data="books.jsonl", seq_len=16384, chunk_size=1024)
    result = train(config)

Without a model and data it is the built-in demo: a small Llama trained from scratch on the synthetic
key→value recall task (`data.RecallTask`), on CPU, in a couple of minutes.

The loop is the engine's caller and nothing else: for each optimizer step it takes the step's
micro-batches, lets SeCO/SpaCO (or ordinary backprop, `method="full"`) fill `.grad`, clips, steps
AdamW and the warm-up + cosine schedule, logs, and now and then writes an atomic checkpoint. Data order
is a pure function of (seed, micro-batch index), and every random state is checkpointed, so a resumed
run continues with exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from chunkwise import __version__
from chunkwise.attention.chunk import ATTENTION_CHOICES
from chunkwise.core.batch import chunk_batch
from chunkwise.core.config import ChunkwiseConfig
from chunkwise.core.engine import SeCO, SpaCO
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.loss import count_targets, sequence_loss
from chunkwise.core.objectives import OBJECTIVES, Objective, PairedLoss, Policy
from chunkwise.core.reference import ADAPTER_DISABLED, resolve_reference
from chunkwise.core.sampling import SAMPLERS
from chunkwise.data.preferences import PreferencePair, collate_pairs, read_preference_pairs
from chunkwise.data.sequences import PACKING_MODES, collate, pad_token_id, read_sequences
from chunkwise.data.synthetic import SYNTHETIC, synthetic_task_for
from chunkwise.models.loading import add_lora, check_position_limit, load_causal_lm, load_model_config, load_tokenizer
from chunkwise.models.presets import DEMO_MODEL
from chunkwise.plan import PlanError, describe_parts, plan_training_step
from chunkwise.recipes.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    begin_checkpoint,
    capture_rng_state,
    checkpoint_name,
    commit_checkpoint,
    latest_checkpoint,
    restore_rng_state,
    verify_checkpoint,
)
from chunkwise.recipes.run import BEST_EVAL, FINAL_MODEL, MODEL_SUBDIR, RUN_FILE, is_run_directory, read_run_settings
from chunkwise.recipes.train import distributed
from chunkwise.recipes.train.distributed import DataParallel
from chunkwise.recipes.train.heldout import (
    HeldOutSet,
    describe_evaluation,
    evaluate_held_out,
    file_held_out,
    synthetic_held_out,
    write_best,
)
from chunkwise.recipes.train.reporting import LOSS_PLOT, METRICS, MetricsLog, TrainingProgress, plot_losses
from chunkwise.utils.memory import format_bytes, parse_bytes, peak_memory_bytes
from chunkwise.utils.precision import PRECISIONS, resolve_device, training_dtypes

logger = logging.getLogger(__name__)

METHODS = ("seco", "spaco", "full")

# The demo's settings, tuned to learn the recall task in about two minutes on two CPU cores.
DEMO_SETTINGS = dict(seq_len=2048, chunk_size=512, batch_size=8, steps=400, lr=1e-2, warmup_ratio=0.05, adam_beta2=0.98, eval_every=100)
# Settings a resumed run may change without changing the trajectory of the steps already planned
# (`attention` changes float rounding only, `offload_kv` nothing at all).
RESUMABLE_CHANGES = {"attention", "offload_kv", "dist_timeout", "memory", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps", "resume", "overwrite", "device", "progress"}


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite losses in a row); the message says why."""


# ----- settings ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of one training run. `None` means "the default for this model/data" (resolved by `resolved()`)."""

    model: str | None = None
    """Hub id, local directory, or tiny preset; None: the demo model (a small Llama, trained from scratch)."""
    data: str | None = None
    """.txt file or folder, .jsonl, .json/.csv/.parquet, a `save_to_disk` folder, a hub dataset, or
    "synthetic" (the key→value recall task, generated on the fly; the default)."""
    output: str = "runs/chunkwise"
    """Run directory: metrics.jsonl, loss.png, checkpoints/, model/."""
    method: str = "seco"
    """"seco" (exact gradient), "spaco" (sampled chunks) or "full" (ordinary backprop, for comparison)."""
    objective: str = "cross-entropy"
    """"cross-entropy" (language modelling / instruction tuning), or a preference objective on prompt /
    chosen / rejected data: "dpo", "ipo" (both against a reference model) or "simpo" (reference-free)."""
    beta: float | None = None
    """Preference objectives: β (default 0.1 for dpo and ipo, 2.0 for simpo)."""
    ref_model: str | None = None
    """dpo / ipo: the reference model (hub id, folder or preset). Default: the trained model with its LoRA
    adapter disabled, or, for full fine-tuning, a frozen copy of --model."""
    chunk_size: int | str | None = None
    """Tokens per chunk (default 1024; the demo 512), or "auto": the largest that fits the device's free
    memory less a 10% margin, as `chunkwise plan` predicts it (decided before any weight loads)."""
    memory: str | None = None
    """With chunk_size="auto": plan for this much memory ("24GiB") instead of the device's free memory."""
    budget: int | None = None
    """SpaCO: chunks backpropagated per step (required with method="spaco")."""
    sampling: str = "uniform"
    """SpaCO selection: "uniform" (the paper's: exactly `budget` chunks), "bernoulli" or "adaptive" (exactly unbiased)."""
    max_compensation: float | None = None
    """SpaCO: cap on the compensation factor (the paper uses 2.0); None: no cap."""
    attention: str = "chunkwise"
    """seco/spaco: "chunkwise" (the engine's attention for SDPA models: no repeated KV heads or mask kept
    for backward) or "model" (the model's own attention throughout)."""
    offload_kv: bool = False
    """seco/spaco: keep the KV cache and its gradient in host memory, streamed to the device block by block."""
    seq_len: int | None = None
    """Tokens per training sequence (default 4096; the demo 2048)."""
    batch_size: int | None = None
    """Sequences per micro-batch (default 1; the demo 8)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalised over all of their targets)."""
    steps: int | None = None
    """Optimizer steps (default 1000; the demo 120)."""
    lr: float | None = None
    """Peak learning rate (default 2e-4 with LoRA, 2e-5 full fine-tuning; the demo 3e-3)."""
    warmup_ratio: float | None = None
    """Fraction of the steps spent warming the learning rate up linearly, then cosine decay to 0 (default 0.05)."""
    weight_decay: float = 0.0
    adam_beta2: float | None = None
    """AdamW's second-moment decay (default 0.999; the demo 0.98). The first is 0.9."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping; the norm is still logged)."""
    seed: int = 0
    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16" (autocast; with
    a loss scaler), or "float64" (for exactness checks)."""
    device: str = "auto"
    lora_r: int | None = None
    """LoRA rank; 0 trains every parameter. Default 8 with `--model`, 0 for the demo (trained from scratch)."""
    lora_alpha: int | None = None
    """LoRA scaling numerator (default 2 × rank: 16 for r=8, as in the paper)."""
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    """Instruction data: the prompt's tokens are context only (label -100), the response's are the targets."""
    chosen_field: str = "chosen"
    """Preference data: the field with the preferred response (the prompt is in --prompt-field, default "prompt")."""
    rejected_field: str = "rejected"
    """Preference data: the field with the dispreferred response."""
    split: str = "train"
    packing: str | None = None
    """"pack" (concatenate documents, cut into seq_len blocks; default for text) or "truncate" (one
    sequence per document; default for instruction data)."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (0: only at the end and on interruption)."""
    keep_checkpoints: int = 1
    eval_every: int | None = None
    """Held-out loss, perplexity and accuracy every N steps (and at the start and end); 0: never. Default:
    100 with `eval_data` or on the demo, else 0."""
    eval_data: str | None = None
    """Held-out data, in any format `data` takes, read like it (tokenizer, fields, seq_len, packing) and
    scored chunk by chunk (`chunkwise.recipes.train.heldout`). None: the synthetic task's held-out stream when training on it."""
    eval_split: str | None = None
    """Split of a dataset `eval_data` names (default: `split`), e.g. "validation"."""
    log_every: int = 10
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    allow_extrapolation: bool = False
    """Train on sequences longer than the model's position limit (warn instead of refusing)."""
    zero: int | None = None
    """Under torchrun: DeepSpeed ZeRO stage (1: optimizer state sharded across ranks, 2: gradients too, 3:
    parameters too) instead of DDP; None: DDP."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP."""
    dist_timeout: float = 1800.0
    """Under torchrun: seconds a rank waits in a collective for the others (a crashed, killed or stuck
    rank) before it stops with an error. It must exceed the longest gap between collectives: one
    optimizer step, or rank 0 writing a checkpoint. 1800 is torch's and Trainer's default."""
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """Fill the `None` defaults for this model/data and check every setting; returns a new config."""
        demo = self.model is None and self.data in (None, SYNTHETIC)
        settings = dataclasses.asdict(self)
        if demo:
            for name, value in DEMO_SETTINGS.items():
                if settings[name] is None:
                    settings[name] = value
        lora_r = settings["lora_r"]
        if lora_r is None:
            lora_r = 0 if self.model is None else 8
        defaults = dict(
            model=DEMO_MODEL if self.model is None else self.model,
            data=SYNTHETIC if self.data is None else self.data,
            chunk_size=1024, seq_len=4096, batch_size=1, steps=1000, warmup_ratio=0.05, adam_beta2=0.999,
            eval_every=100 if self.eval_data else 0,
            lr=2e-4 if lora_r else 2e-5, lora_r=lora_r, lora_alpha=2 * lora_r,
            packing="truncate" if self.prompt_field or self.objective != "cross-entropy" else "pack",
        )
        if self.objective != "cross-entropy":
            defaults.update(beta=2.0 if self.objective == "simpo" else 0.1, prompt_field="prompt")
        for name, value in defaults.items():
            if settings[name] is None:
                settings[name] = value
        config = TrainConfig(**settings)
        config.check()
        return config

    def _check_sharding(self) -> None:
        if self.zero is None and not self.fsdp:
            return
        option = "--fsdp" if self.fsdp else f"--zero {self.zero}"
        if self.zero is not None and self.fsdp:
            raise ValueError("--zero (DeepSpeed) and --fsdp (FSDP2) are two ways to shard the training state: give one")
        if self.zero is not None and self.zero not in (1, 2, 3):
            raise ValueError(f"--zero must be 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters), got {self.zero}")
        if self.method == "full":
            raise ValueError(f"{option} trains chunk-wise: use --method seco or spaco (full backprop runs through DDP)")
        if self.dtype == "float16":
            raise ValueError(f"{option} does not run with float16's loss scaler: use --dtype bfloat16 (or float32)")
        if self.zero is not None and self.dtype == "float64":
            raise ValueError("--zero: DeepSpeed trains in float32 or bfloat16 (its optimizers keep float32 gradients); use --dtype float32")

    def check(self) -> None:
        """Raise ValueError naming the setting for anything out of range (call on a resolved config)."""
        positive = ("chunk_size", "seq_len", "batch_size", "grad_accum", "steps", "keep_checkpoints", "log_every", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if name == "chunk_size" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("checkpoint_every", "eval_every", "lora_r", "lora_alpha", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "spaco" and self.budget is None:
            raise ValueError("--method spaco needs --budget: how many chunks to backpropagate per step")
        if self.method != "spaco" and (self.budget is not None or self.max_compensation is not None):
            raise ValueError("--budget and --max-compensation only apply to --method spaco")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.offload_kv and self.method == "full":
            raise ValueError("--offload-kv applies to --method seco or spaco (full backprop keeps no KV cache)")
        if self.sampling not in SAMPLERS:
            raise ValueError(f"--sampling must be one of {', '.join(SAMPLERS)}, got {self.sampling!r}")
        self._check_sharding()
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"--packing must be one of {', '.join(PACKING_MODES)}, got {self.packing!r}")
        if self.eval_data is not None and not self.eval_every:
            raise ValueError("--eval-data needs --eval-every N > 0: how many steps between held-out evaluations")
        if self.eval_every and self.eval_data is None and self.data != SYNTHETIC:
            raise ValueError(f"--eval-every {self.eval_every} needs held-out data for --data {self.data}: give --eval-data PATH")
        if self.memory is not None:
            if self.chunk_size != "auto":
                raise ValueError("--memory sets the budget of --chunk-size auto; add --chunk-size auto or drop --memory")
            parse_bytes(self.memory, "--memory")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output and --overwrite replaces it: give only one")
        self._check_objective()

    def _check_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "cross-entropy":
            if self.beta is not None or self.ref_model is not None:
                raise ValueError("--beta and --ref-model apply to preference objectives (--objective dpo, ipo, simpo)")
            return
        name = f"--objective {self.objective}"
        if self.data == SYNTHETIC:
            raise ValueError(f"{name} trains on preference pairs: give --data with prompt / chosen / rejected fields")
        if self.response_field is not None:
            raise ValueError(f"{name} reads --chosen-field and --rejected-field, not --response-field")
        if self.eval_data is not None:
            raise ValueError(f"{name}: --eval-data scores held-out cross-entropy, not preference pairs; drop --eval-data and --eval-every")
        if self.packing != "truncate":
            raise ValueError(f"{name} keeps each preference pair whole: --packing must be truncate")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta must be a positive number, got {self.beta}")
        if self.objective == "simpo" and self.ref_model is not None:
            raise ValueError("--objective simpo is reference-free; drop --ref-model")


@dataclass
class TrainResult:
    """What a run did: its last step, the first and last logged losses, and held-out scores if any."""

    output: Path
    step: int
    first_loss: float | None
    last_loss: float | None
    skipped_steps: int
    interrupted: int | None
    """The signal that stopped the run early (SIGINT, SIGTERM), or None."""
    evaluations: list[dict]


# ----- set-up -----------------------------------------------------------------------------------------


def check_output(config: TrainConfig) -> Path:
    """Refuse to mix runs in one directory unless told to resume or overwrite; nothing is written yet."""
    output = Path(config.output).expanduser()
    blocking = next((path for path in (output, *output.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--output {output}: {blocking} is a file, not a directory; choose a directory path for the run")
    if config.resume:
        if not is_run_directory(output):
            raise ValueError(f"--resume: {output} holds no chunkwise run to continue (no {RUN_FILE}); drop --resume to start one")
    elif output.exists() and any(output.iterdir()):
        if not is_run_directory(output):
            raise ValueError(f"--output {output} is not empty and is not a chunkwise run; choose a new or empty directory")
        if not config.overwrite:
            raise ValueError(f"--output {output} holds another run; pass --resume to continue it or --overwrite to replace it")
    return output


def start_run_directory(config: TrainConfig) -> Path:
    """Create the run directory (replacing a previous run with --overwrite) and record the settings.

    Called only once the model and data have loaded, so a run that fails to start leaves nothing behind.
    """
    output = check_output(config)
    if output.exists() and config.overwrite:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    record = {"version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": dataclasses.asdict(config)}
    (output / RUN_FILE).write_text(json.dumps(record, indent=1))
    return output


def check_resume_settings(config: TrainConfig, output: Path, log) -> None:
    """A resumed run must use the settings it started with (except the few in RESUMABLE_CHANGES)."""
    saved = read_run_settings(output)
    current = dataclasses.asdict(config)
    changed = [name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]]
    if changed:
        listing = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"--resume with different settings than the run in {output} was started with ({listing}); "
                         "resume with the same settings or start a new run")
    if saved.get("steps") != config.steps:
        log(f"note: --steps changed from {saved.get('steps')} to {config.steps}; the cosine schedule follows the new total")


def check_before_loading(config: TrainConfig, output: Path, device: torch.device, dist: Distributed, log) -> TrainConfig:
    """What the model's config alone decides, before any weight or tokenizer loads: the model exists, the
    length is within its positions, and `--chunk-size auto` becomes a number (`chunkwise.plan`)."""
    model_config = load_model_config(config.model)
    check_position_limit(model_config, config.seq_len, allow=config.allow_extrapolation, log=log)
    check_reference_config(config, model_config)
    if config.chunk_size != "auto":
        return config
    if separate_reference(config):
        raise ValueError(
            f"--chunk-size auto does not plan the memory of a separate reference model ({config.ref_model or 'a frozen copy of --model'}); "
            "give --chunk-size, or train LoRA without --ref-model (the reference is then the base model, adapter disabled)"
        )
    if config.resume:  # the run goes on with the chunks it started with
        return dataclasses.replace(config, chunk_size=read_run_settings(output)["chunk_size"])
    weights, autocast = training_dtypes(config.dtype, device)
    try:
        plan = plan_training_step(
            model_config, name=config.model, seq_len=config.seq_len, precision=str(autocast or weights).removeprefix("torch."),
            device=device, method=config.method, offload_kv=config.offload_kv, lora_r=config.lora_r,
            lora_targets=tuple(name.strip() for name in config.lora_targets.split(",") if name.strip()),
            # a preference micro-batch holds batch_size pairs: 2 x batch_size rows
            batch_size=config.batch_size * (1 if config.objective == "cross-entropy" else 2),
            attention=config.attention, memory=config.memory and parse_bytes(config.memory, "--memory"),
        )
    except PlanError as error:
        raise ValueError(f"--chunk-size auto: {error}") from None
    chunk = torch.tensor([plan.chunk_size or config.seq_len], device=device if device.type == "cuda" else "cpu")
    if dist.world_size > 1:  # every rank cuts its sequences the same way
        torch.distributed.all_reduce(chunk, op=torch.distributed.ReduceOp.MIN)
    log(f"--chunk-size auto: {int(chunk)} tokens; predicted peak {format_bytes(plan.total(device.type))} ({describe_parts(plan)})")
    return dataclasses.replace(config, chunk_size=int(chunk))


def separate_reference(config: TrainConfig) -> bool:
    """True when a preference run loads a reference model of its own (not the LoRA model's disabled adapter)."""
    return getattr(OBJECTIVES[config.objective], "needs_reference", False) and (config.ref_model is not None or config.lora_r == 0)


def check_reference_config(config: TrainConfig, model_config) -> None:
    """--ref-model must read the trained model's token ids: compared from the configs, before any weight loads."""
    if config.ref_model is None:
        return
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    reference_vocab = getattr(load_model_config(config.ref_model).get_text_config(), "vocab_size", None)
    if None not in (vocab, reference_vocab) and vocab != reference_vocab:
        raise ValueError(
            f"--ref-model {config.ref_model}: the reference model's vocabulary has {reference_vocab} tokens, {config.model}'s "
            f"{vocab}; a reference must read the same token ids (use the same base model and tokenizer)"
        )


def tokenizer_for(config: TrainConfig):
    """The model's tokenizer (None for tiny presets, and for a model without one on the synthetic task)."""
    try:
        return load_tokenizer(config.model)
    except (OSError, ValueError) as error:
        if config.data != SYNTHETIC:  # only file data needs one
            raise ValueError(f"cannot load a tokenizer for {config.model} ({str(error).splitlines()[0]}); save one with the model") from None
        return None


def training_sequences(config: TrainConfig, tokenizer) -> list | None:
    """Training rows from the data files (None for the synthetic task). Runs before the model loads, so
    a problem in the data is reported at once, not after minutes of loading weights."""
    if config.data == SYNTHETIC:
        return None
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer, so --data {config.data} cannot be read; use a model folder with its tokenizer")
    if config.objective != "cross-entropy":
        return read_preference_pairs(
            config.data, tokenizer, seq_len=config.seq_len, prompt_field=config.prompt_field,
            chosen_field=config.chosen_field, rejected_field=config.rejected_field, split=config.split,
        )
    return read_sequences(
        config.data, tokenizer, seq_len=config.seq_len, packing=config.packing, text_field=config.text_field,
        prompt_field=config.prompt_field, response_field=config.response_field, split=config.split,
    )


def held_out_rows(config: TrainConfig, tokenizer) -> HeldOutSet | None:
    """The `--eval-data` rows (None without it, or for the synthetic task's own stream). Read before the
    model loads, like the training data, so a problem in them is reported at once."""
    if not config.eval_every or config.eval_data in (None, SYNTHETIC):
        return None
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer, so --eval-data {config.eval_data} cannot be read; use a model folder with its tokenizer")
    return file_held_out(
        config.eval_data, tokenizer, batch_size=config.batch_size, seq_len=config.seq_len, packing=config.packing,
        pad_token_id=pad_token_id(tokenizer), text_field=config.text_field, prompt_field=config.prompt_field,
        response_field=config.response_field, split=config.eval_split or config.split,
    )


def build_model(config: TrainConfig, device: torch.device):
    """The model to train: loaded (or built from a preset), LoRA-wrapped unless lora_r=0, on `device`."""
    weights_dtype, _ = training_dtypes(config.dtype, device, frozen_base=config.lora_r > 0)
    model = load_causal_lm(config.model, dtype=weights_dtype, seed=config.seed)
    if config.lora_r > 0:
        targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
        model = add_lora(model, rank=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=targets,
                         option="--lora-targets")
    return model.to(device)


class BatchStream:
    """Micro-batch number `index` → a collated batch; a pure function of (seed, index), so resume needs only the index."""

    def __init__(self, config: TrainConfig, sequences: list | None, pad: int, vocab_size: int):
        self.config = config
        self.task = synthetic_task_for(vocab_size) if sequences is None else None
        self.sequences, self.pad = sequences, pad
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.sequences) if self.sequences is not None else 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        size = self.config.batch_size
        if self.task is not None:
            return self.task.batch(index, batch_size=size, seq_len=self.config.seq_len, seed=self.config.seed)
        # Sequence positions index*size ... run through epochs, each a seeded shuffle of the data.
        rows = [self.sequences[self._position(p)] for p in range(index * size, (index + 1) * size)]
        if isinstance(rows[0], PreferencePair):  # batch_size pairs: the chosen rows, then the rejected ones
            return collate_pairs(rows, pad_token_id=self.pad)
        return collate(rows, pad_token_id=self.pad)

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.sequences))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(len(self.sequences), generator=generator).tolist()}
        return self._orders[epoch][offset]


# ----- distributed (torchrun) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1): nccl on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), resolve_device(config.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=config.dist_timeout)
        )
    return Distributed(torch.distributed.get_rank(), world_size), device


def is_lost_rank(error: BaseException) -> bool:
    """True for a collective that failed because another rank is gone or silent past the timeout.

    nccl raises `torch.distributed.DistError`s; gloo raises plain RuntimeErrors from its transport
    ("Connection closed by peer", "Timed out waiting ... for recv"), recognisable by gloo's source path.
    """
    return isinstance(error, torch.distributed.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


def lost_rank_error(error: BaseException, dist: Distributed, config: TrainConfig) -> TrainingError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TrainingError(
        f"rank {dist.rank} of {dist.world_size} stopped: it lost contact with another rank, which crashed, was "
        f"killed, or did not answer within --dist-timeout {config.dist_timeout:g} s (see that rank's output above). "
        f"Checkpoints already written in {config.output} are intact; continue with --resume. [{reason}]"
    )


# ----- one optimizer step -----------------------------------------------------------------------------


def full_backward(model: torch.nn.Module, batch: dict, num_items: float, objective: Objective | None = None, policy: Policy | None = None):
    """Ordinary backprop of one micro-batch's loss over `num_items`; returns the detached loss and the
    objective's metrics. Cross-entropy by default; another objective runs on the full sequence's logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if objective is None:
        loss = sequence_loss(logits, batch["labels"], num_items=num_items)
        loss.backward()
        return loss.detach(), {}
    handle = policy.handle
    whole = chunk_batch(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"], num_items=num_items,
                        chunk_size=batch["input_ids"].shape[1], vocab_size=handle.vocab_size, hidden_size=handle.hidden_size, device=logits.device)
    bound = objective.bind(whole, num_items=num_items, policy=policy)
    loss = bound.full_sequence_loss(logits)
    loss.backward()
    return loss.detach(), bound.metrics()


def step_backward(model, engine, batches: list[dict], *, num_items: float, autocast_dtype, device, backend: DataParallel, objective=None, policy=None,
                  metrics: dict | None = None) -> float:
    """Fill `.grad` with the gradient of (sum of the step's losses) / num_items; return that loss.

    `metrics`, if given, collects the objective's statistics: a list of per-micro-batch values per name.
    """
    total = 0.0
    for number, batch in enumerate(batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        # Across ranks only the step's last micro-batch reduces the gradients; the engine reads it from the wrapper.
        with backend.micro_batch(last=number == len(batches) - 1), \
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if engine is None:
                loss, extra = full_backward(model, batch, num_items, objective, policy)
            else:
                out = engine.backward(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                                      num_items=num_items, objective=objective)
                loss, extra = out.loss, out.metrics
        total += float(loss)
        for key, value in extra.items():
            if metrics is not None:
                metrics.setdefault(key, []).append(value)
    return total


def _pad_to(batch: dict, width: int, pad: int) -> dict:
    """Right-pad a collated batch (`input_ids`, `attention_mask`, `labels`, each `[B, T]`) to `[B, width]`."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad, "attention_mask": 0, "labels": -100}
    return {key: torch.nn.functional.pad(value, (0, extra), value=fill[key]) for key, value in batch.items()}


def count_items(batch: dict, objective: Objective | None) -> int:
    """What a micro-batch's loss is normalised by: its valid targets, or its pairs for a preference objective."""
    if isinstance(objective, PairedLoss):
        return batch["input_ids"].shape[0] // 2
    return count_targets(batch["labels"])


@dataclass
class _Trainer:
    """What one optimizer step needs, set up once by `train`."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    model: torch.nn.Module
    backend: DataParallel
    engine: SeCO | None
    scheduler: object
    scaler: torch.amp.GradScaler
    data: BatchStream
    autocast_dtype: torch.dtype | None
    objective: Objective | None = None
    policy: Policy | None = None


def optimizer_step(trainer: _Trainer, step: int) -> dict:
    """Optimizer step number `step` (1-based): its micro-batches' backward, clipping, the update unless the
    loss or gradient is non-finite, the schedule. Returns the step's `metrics.jsonl` record."""
    config, dist, scaler = trainer.config, trainer.dist, trainer.scaler
    started = time.perf_counter()
    first_index = (step - 1) * config.grad_accum * dist.world_size
    batches = [trainer.data.batch(first_index + a * dist.world_size + dist.rank) for a in range(config.grad_accum)]
    if trainer.engine is not None and trainer.engine.sync.lockstep:
        # ZeRO-3: every rank must run as many chunks as the others (see chunkwise.core.sync).
        batches = [_pad_to(batch, config.seq_len, trainer.data.pad) for batch in batches]
    (global_targets,) = dist.all_sum([float(sum(count_items(b, trainer.objective) for b in batches))])
    global_targets = max(global_targets, 1.0)
    # DDP averages gradients over ranks; dividing by (all targets / ranks) makes the result the gradient
    # of the mean over every target of the step, as one process with the whole batch. float16: the loss
    # scaler's factor goes into the normaliser, so the backward is scaled as `scaler.scale(loss)` would be.
    loss_scale = float(scaler.scale(torch.ones((), device=trainer.device))) if scaler.is_enabled() else 1.0
    num_items = global_targets / dist.world_size / loss_scale
    trainer.model.train()
    objective_metrics = {}
    loss_sum = step_backward(
        trainer.backend.engine_model, trainer.engine, batches, num_items=num_items, autocast_dtype=trainer.autocast_dtype,
        device=trainer.device, backend=trainer.backend, objective=trainer.objective, policy=trainer.policy, metrics=objective_metrics,
    )
    (loss_sum,) = dist.all_sum([loss_sum * num_items])  # the summed loss, unscaled
    loss = loss_sum / global_targets

    # Under float16 an infinite gradient is the scaler's business (it skips the update and lowers the scale).
    # DeepSpeed decides itself: it skips a step whose gradient is not finite.
    grad_norm, applied = trainer.backend.step(
        max_grad_norm=config.max_grad_norm, scaler=scaler,
        finite=lambda norm: math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()),
    )
    finite = applied and math.isfinite(loss)
    trainer.scheduler.step()

    seconds = time.perf_counter() - started
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * dist.world_size
    return {
        "kind": "train", "step": step, "loss": loss if finite else None, "skipped": not finite,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "lr": trainer.scheduler.get_last_lr()[0],
        "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        # e.g. DPO's rewards/margins, averaged over this rank's micro-batches
        **{key: sum(values) / len(values) for key, values in objective_metrics.items()},
    }


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, checkpoints and exits. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, number, frame) -> None:
        self.signal = number
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # the next one is not caught

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# ----- the recipe -------------------------------------------------------------------------------------


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training as `config` says; see the module docstring."""
    config = config.resolved()
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist, device = init_distributed(config)
    try:
        result = _train_on_this_rank(config, dist, device, log)
    except (RuntimeError, torch.distributed.DistError) as error:
        if dist.world_size > 1 and is_lost_rank(error):
            raise lost_rank_error(error, dist, config) from error
        raise
    if dist.world_size > 1 and joined_here:
        # Leave the group we joined explicitly, every rank done, rather than at interpreter exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _train_on_this_rank(config: TrainConfig, dist: Distributed, device: torch.device, log: Callable[[str], None]) -> TrainResult:
    if (config.zero is not None or config.fsdp) and dist.world_size == 1:
        raise ValueError(f"{'--fsdp' if config.fsdp else '--zero'} shards the training state across processes: launch "
                         "with torchrun --nproc_per_node N (N > 1) -m chunkwise.cli train ...")
    output = check_output(config)
    log = log if dist.is_main else (lambda message: None)
    config = check_before_loading(config, output, device, dist, log)
    if config.resume and dist.is_main:
        check_resume_settings(config, output, log)

    tokenizer = tokenizer_for(config)
    sequences = training_sequences(config, tokenizer)
    held_out = held_out_rows(config, tokenizer)
    torch.manual_seed(config.seed)
    model = build_model(config, device)
    handle = inspect_causal_lm(model)
    objective = make_objective(config, model, handle, device)
    data = BatchStream(config, sequences, pad_token_id(tokenizer) if tokenizer is not None else 0, handle.vocab_size)
    if held_out is None and config.eval_every:  # the synthetic task's own held-out stream
        held_out = synthetic_held_out(data.task or synthetic_task_for(handle.vocab_size), batch_size=config.batch_size,
                                      seq_len=config.seq_len, seed=config.seed)
    _, autocast_dtype = training_dtypes(config.dtype, device, frozen_base=config.lora_r > 0)
    if not config.resume and dist.is_main:
        start_run_directory(config)
    if dist.world_size > 1:
        torch.distributed.barrier()  # the run directory exists before any rank writes or reads it

    backend = distributed.setup(
        model, lambda parameters: torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, config.adam_beta2), weight_decay=config.weight_decay),
        world_size=dist.world_size, device=device, zero=config.zero, fsdp=config.fsdp,
        micro_batch_size=config.batch_size, accumulation=config.grad_accum, max_grad_norm=config.max_grad_norm,
    )
    # Given the wrapper (DDP, DeepSpeed engine, FSDP2 model), the engine reduces the gradients once per step.
    engine = _make_engine(config, backend.engine_model)
    optimizer = backend.optimizer
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    state = {"step": 0, "bad_in_a_row": 0, "skipped": 0}
    metrics = MetricsLog(output / METRICS)
    if config.resume:
        state = _load_checkpoint(output, model, backend, scheduler, scaler, engine, dist, log)
        if dist.is_main:
            metrics.truncate_after(state["step"])

    def save(step: int) -> Path:
        return _save_checkpoint(output, step, model, tokenizer, backend, scheduler, scaler, engine, state, config, dist)

    # A resumed run keeps the evaluations made before its checkpoint (the best step may be among them).
    evaluations = [r for r in metrics.records() if r["kind"] == "eval"] if config.resume and dist.is_main else []

    def evaluate_now(step: int) -> dict | None:
        if held_out is None:
            return None
        record = evaluate_held_out(handle, held_out, step=step, chunk_size=config.chunk_size, device=device, autocast_dtype=autocast_dtype)
        evaluations.append(record)
        if dist.is_main:
            metrics.append(record)
            log(describe_evaluation(record, write_best(output / BEST_EVAL, evaluations)))
        return record

    log(_describe(config, model, device, dist, len(data), backend))
    if state["step"] == 0:
        evaluate_now(0)
    first_loss = last_loss = None
    interrupted = None
    started = time.perf_counter()
    policy = Policy(backend.engine_model, handle, config.chunk_size)
    trainer = _Trainer(config, dist, device, model, backend, engine, scheduler, scaler, data, autocast_dtype, objective, policy)
    with StopRequest() as stop, TrainingProgress(total_steps=config.steps, start_step=state["step"], log_every=config.log_every, enabled=config.progress and dist.is_main) as progress:
        progress.held_out(evaluations[-1] if evaluations else None)
        while state["step"] < config.steps:
            step = state["step"] + 1
            record = optimizer_step(trainer, step)
            state["step"] = step
            if dist.is_main:
                metrics.append(record)
                progress.step(record)
            if not record["skipped"]:
                state["bad_in_a_row"] = 0
                first_loss = record["loss"] if first_loss is None else first_loss
                last_loss = record["loss"]
            else:
                state["bad_in_a_row"] += 1
                state["skipped"] += 1
                log(f"step {step}: non-finite loss or gradient; step skipped "
                    f"({state['bad_in_a_row']} in a row, {state['skipped']} in all)")
                if state["bad_in_a_row"] >= config.max_bad_steps:
                    _finish_plot(output, metrics, config, dist)
                    kept = latest_checkpoint(output)
                    raise TrainingError(
                        f"{state['bad_in_a_row']} steps in a row had a non-finite loss or gradient; stopped at step {step} "
                        f"without saving. Last good checkpoint: {kept or 'none yet'}. Lower --lr, check the data, or "
                        "raise --max-bad-steps."
                    )
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                progress.held_out(evaluate_now(step))
            if _stop_requested(stop, dist):
                interrupted = stop.signal or signal.SIGTERM
                path = save(step)
                log(f"interrupted by {signal.Signals(stop.signal).name if stop.signal else 'another rank'} at step {step}; "
                    f"checkpoint saved to {path}. Continue with the same command and --resume.")
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save(step)

    if not interrupted:
        save(state["step"])
        full_state = backend.model_state()  # gathered from the shards on every rank, kept by rank 0
        if dist.is_main:
            _save_model(output / FINAL_MODEL, model, tokenizer, state_dict=full_state)
    _finish_plot(output, metrics, config, dist)
    elapsed = time.perf_counter() - started
    if dist.is_main and not interrupted:
        log(f"done: {state['step']} steps in {elapsed:.0f} s; model in {output / FINAL_MODEL}")
        if evaluations:
            spent = sum(r["seconds"] for r in evaluations)
            log(f"held-out evaluation: {len(evaluations)} evaluations, {spent:.1f} s in all "
                f"({spent / max(elapsed, 1e-9):.0%} of this session's {elapsed:.0f} s); best step in {output / BEST_EVAL}")
    return TrainResult(output, state["step"], first_loss, last_loss, state["skipped"], interrupted, evaluations)


def _make_engine(config: TrainConfig, model: torch.nn.Module):
    """The engine of a seco/spaco run (None for --method full), built by `ChunkwiseConfig.make_engine`."""
    if config.method == "full":
        return None
    spaco = config.method == "spaco"
    engine = ChunkwiseConfig(method=config.method, chunk_size=config.chunk_size, attention=config.attention,
                             offload_kv=config.offload_kv, sampling=config.sampling, seed=config.seed,
                             budget=config.budget if spaco else None,
                             max_compensation=config.max_compensation if spaco else None)
    return engine.make_engine(model)


def make_objective(config: TrainConfig, model: torch.nn.Module, handle, device: torch.device) -> Objective | None:
    """The objective of a preference run (None: cross-entropy), with its reference model.

    dpo / ipo compare with a reference: --ref-model, else the trained model with its LoRA adapter
    disabled, else a frozen copy of --model (loaded again, before training changes anything).
    """
    if config.objective == "cross-entropy":
        return None
    cls = OBJECTIVES[config.objective]
    if not cls.needs_reference:
        return cls(beta=config.beta)
    if not separate_reference(config):
        reference = ADAPTER_DISABLED
    else:
        weights_dtype, _ = training_dtypes(config.dtype, device, frozen_base=True)
        reference = load_causal_lm(config.ref_model or config.model, dtype=weights_dtype, seed=config.seed).to(device).eval()
        reference.requires_grad_(False)
    resolve_reference(reference, model, handle, owner="--ref-model")  # a wrong vocabulary fails now, not at step 1
    return cls(beta=config.beta, reference=reference)


def _stop_requested(stop: StopRequest, dist: Distributed) -> bool:
    """Every rank stops at the same step if any rank got a signal (no rank waits in a collective alone)."""
    (requests,) = dist.all_sum([1.0 if stop.signal is not None else 0.0])
    return requests > 0


def _describe(config: TrainConfig, model, device, dist: Distributed, num_sequences: int, backend: DataParallel) -> str:
    # Sizes from the model's own shapes: ZeRO-3 leaves each rank a flat shard (`ds_numel` is the whole).
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    trainable = sum(n for n, grad in sizes if grad)
    total = sum(n for n, _ in sizes)
    unit = "sequences" if config.objective == "cross-entropy" else "preference pairs"
    what = "synthetic key→value recall" if config.data == SYNTHETIC else f"{config.data} ({num_sequences} {unit})"
    method = config.method + (f" (budget {config.budget}, {config.sampling})" if config.method == "spaco" else "")
    if config.objective != "cross-entropy":
        reference = "" if config.objective == "simpo" else f", reference {config.ref_model or ('the base model (adapter disabled)' if config.lora_r else 'a frozen copy of --model')}"
        method += f", objective {config.objective} (beta {config.beta:g}{reference})"
    return (
        f"chunkwise train: {config.model} ({trainable:,} of {total:,} parameters trained"
        f"{', LoRA r=' + str(config.lora_r) if config.lora_r else ''}) on {device}"
        f"{f' x {dist.world_size} ranks ({backend.name})' if dist.world_size > 1 else ''}\n"
        f"  data {what}; {config.batch_size} x {config.seq_len} tokens per micro-batch, {config.grad_accum} per step; "
        f"{method}, chunks of {config.chunk_size}; {config.steps} steps, lr {config.lr:g}; run directory {config.output}"
    )


# ----- saving and loading -----------------------------------------------------------------------------


def _save_model(folder: Path, model, tokenizer, *, state_dict: dict | None = None) -> None:
    """`save_pretrained` (the adapter alone for a PEFT model) and the tokenizer: loadable without chunkwise.

    `state_dict`: the full weights when the model itself holds only this rank's shards (ZeRO-3, FSDP2).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of training output
    model.save_pretrained(str(folder), **({} if state_dict is None else {"state_dict": state_dict}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _save_checkpoint(output, step, model, tokenizer, backend: DataParallel, scheduler, scaler, engine, state, config, dist) -> Path | None:
    """Every rank takes part (sharded state, RNG states); rank 0 writes the rest and seals the folder."""
    rng = capture_rng_state()
    ranks_rng = [rng]
    if dist.world_size > 1:
        ranks_rng = [None] * dist.world_size
        torch.distributed.all_gather_object(ranks_rng, rng)
    model_state = backend.model_state()  # a collective when the parameters are sharded

    def write(folder: Path) -> None:
        _save_model(folder / MODEL_SUBDIR, model, tokenizer, state_dict=model_state)
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(scaler.state_dict(), folder / "scaler.pt")
        torch.save(ranks_rng, folder / "rng.pt")
        if isinstance(engine, SpaCO):
            torch.save(engine.state_dict(), folder / "sampler.pt")
        (folder / "state.json").write_text(json.dumps({**state, "world_size": dist.world_size, "config": dataclasses.asdict(config)}, indent=1))

    # Rank 0 opens the temporary folder; every rank writes its part (the optimizer state, or its shards);
    # rank 0 adds the rest and renames the folder into place.
    temporary = begin_checkpoint(output, step) if dist.is_main else None
    if dist.world_size > 1:
        shared = [temporary]
        torch.distributed.broadcast_object_list(shared, src=0)
        (temporary,) = shared
    final = None
    if temporary is not None:
        backend.save_state(temporary, is_main=dist.is_main)
        if dist.world_size > 1:
            torch.distributed.barrier()  # every shard is written
        if dist.is_main:
            write(temporary)
            final = commit_checkpoint(output, step, temporary, keep=config.keep_checkpoints)
    elif dist.is_main:
        final = output / CHECKPOINTS / checkpoint_name(step)  # this step's checkpoint exists (checked)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return final


def _load_checkpoint(output, model, backend: DataParallel, scheduler, scaler, engine, dist, log) -> dict:
    """Restore everything a checkpoint holds; errors name the checkpoint and the file, and delete nothing."""
    folder = latest_checkpoint(output)
    if folder is None:
        raise CheckpointError(f"--resume: {output} has no complete checkpoint yet; start again with --overwrite")
    verify_checkpoint(folder)
    state = json.loads((folder / "state.json").read_text())
    if state.pop("world_size") != dist.world_size:
        raise CheckpointError(f"{folder} was written by a run with a different number of processes; resume with the same number")
    state.pop("config", None)
    if not backend.sharded:
        _load_weights(model, folder / MODEL_SUBDIR)
    backend.load_state(folder)  # the optimizer state; sharded set-ups restore the model's shards too
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    if isinstance(engine, SpaCO):
        engine.load_state_dict(torch.load(folder / "sampler.pt", weights_only=False))
    restore_rng_state(torch.load(folder / "rng.pt", weights_only=False)[dist.rank])
    log(f"resumed from {folder} (step {state['step']})")
    return state


def _load_weights(model, folder: Path) -> None:
    """Load the trainable weights a checkpoint's model folder holds into the freshly built `model`."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{folder}/adapter_model.safetensors does not fit this model (unexpected {unexpected[:3]})")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint model folder {folder} has no model.safetensors")
    weights = {}
    for file in files:
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded = {t.data_ptr() for name, t in model.state_dict().items() if name in weights}
    really_missing = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]  # tied weights are shared
    if really_missing or unexpected:
        raise CheckpointError(f"{folder} does not fit this model (missing {really_missing[:3]}, unexpected {unexpected[:3]})")


def _finish_plot(output: Path, metrics: MetricsLog, config: TrainConfig, dist: Distributed) -> None:
    if dist.is_main:
        plot_losses(metrics.records(), output / LOSS_PLOT, title=f"{config.model}: {config.method}, {config.seq_len} tokens")
