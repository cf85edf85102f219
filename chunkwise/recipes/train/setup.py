"""Setting up a `chunkwise train` run, in the order the recipe calls it: check the run directory, decide
what the model's config alone decides (position limit, reference vocabulary, `--chunk-size auto`), read the
data, then build the model, its objective and its engine. Each check runs before anything slow loads, so
that a mistake is reported in seconds and a run that fails to start leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path

import torch

from chunkwise import __version__
from chunkwise.core.config import ChunkwiseConfig
from chunkwise.core.objectives import OBJECTIVES, Objective
from chunkwise.core.reference import ADAPTER_DISABLED, resolve_reference
from chunkwise.data.preferences import read_preference_pairs
from chunkwise.data.files import load_records
from chunkwise.data.sequences import canonical_packing, hold_out, pad_token_id, read_sequences, sequences_from_records
from chunkwise.data.synthetic import SYNTHETIC
from chunkwise.models.loading import (
    add_lora,
    check_position_limit,
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    preset_text_vocab,
)
from chunkwise.models.presets import DEMO_MODEL, PRESETS
from chunkwise.plan import PlanError, describe_parts, plan_training_step
from chunkwise.recipes.run import PATH_SETTINGS, RUN_FILE, check_output, read_run_record, read_run_settings, resolved_paths
from chunkwise.recipes.train.config import RESUMABLE_CHANGES, TrainConfig
from chunkwise.recipes.train.distributed import Distributed
from chunkwise.recipes.train.heldout import HeldOutSet, file_held_out, rows_held_out
from chunkwise.utils.memory import format_bytes, parse_bytes
from chunkwise.utils.precision import training_dtypes

# ----- the run directory ------------------------------------------------------------------------------


def start_run_directory(config: TrainConfig) -> Path:
    """Create the run directory (replacing a previous run with --overwrite) and record the settings.

    Called only once the model and data have loaded, so a run that fails to start leaves nothing behind.
    """
    output = check_output(config)
    if output.exists() and config.overwrite:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(config)
    # The run is identified by its id, not by where it lies: a run moved or copied elsewhere resumes all the same
    # (its checkpoints carry the id; `TrainingState.load` checks it).
    record = {"run_id": uuid.uuid4().hex, "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "config": settings, "paths": resolved_paths(settings)}
    (output / RUN_FILE).write_text(json.dumps(record, indent=1))
    return output


def check_resume_settings(config: TrainConfig, output: Path) -> None:
    """A resumed run must use the settings it started with (except the few in RESUMABLE_CHANGES), and its step count.

    Path-valued settings match when they name the same file or folder (relative or absolute, from any working
    directory: the run recorded their absolute form).
    """
    record = read_run_record(output)
    saved, saved_paths = record["config"], record.get("paths", {})
    if saved.get("packing") is not None:  # a run started before `pack` became `concat` resumes as it trained
        saved = {**saved, "packing": canonical_packing(saved["packing"])}
    # A setting added after the run started is absent from its record: the run trained with that setting's default.
    saved = {**{field.name: field.default for field in dataclasses.fields(TrainConfig) if field.name not in saved}, **saved}
    current = dataclasses.asdict(config)
    current_paths = resolved_paths(current)
    if saved.get("steps") != config.steps:
        # The warm-up + cosine schedule was laid out over the run's steps: another total would move the learning
        # rate of every remaining step (at the old end, from 0 back up towards the peak). Refused, not reinterpreted.
        raise ValueError(
            f"--resume --steps {config.steps}: the run in {output} was started with --steps {saved.get('steps')}, and its "
            "learning-rate schedule (warm-up, cosine decay to 0 at the last step) is fixed by that number; resume without "
            "--steps, or train longer in a new run (another --output)"
        )
    changed = [name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]
               and not (name in PATH_SETTINGS and name in current_paths and current_paths[name] == saved_paths.get(name))]
    if changed:
        listing = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"--resume with different settings than the run in {output} was started with ({listing}); "
                         "resume with the same settings or start a new run")


# ----- what the model's config decides ---------------------------------------------------------------


def check_before_loading(config: TrainConfig, output: Path, device: torch.device, dist: Distributed, log) -> TrainConfig:
    """What the model's config alone decides, before any weight or tokenizer loads: the model exists, the
    length is within its positions, and `--chunk-size auto` becomes a number (`chunkwise.plan`)."""
    model_config = load_model_config(config.model)
    if text_vocab(config, config.model):  # a tiny preset reading text is built with its byte tokenizer's ids
        model_config.vocab_size = text_vocab(config, config.model)
    check_position_limit(model_config, config.seq_len, allow=config.allow_extrapolation, log=log)
    check_reference_config(config, model_config)
    if config.chunk_size != "auto":
        note_one_chunk(config, log)
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
            quantization=config.quantization(),
        )
    except PlanError as error:
        raise ValueError(f"--chunk-size auto: {error}") from None
    chunk = torch.tensor([plan.chunk_size or config.seq_len], device=device if device.type == "cuda" else "cpu")
    if dist.world_size > 1:  # every rank cuts its sequences the same way
        torch.distributed.all_reduce(chunk, op=torch.distributed.ReduceOp.MIN)
    log(f"--chunk-size auto: {int(chunk)} tokens; predicted peak {format_bytes(plan.total(device.type))} ({describe_parts(plan)})")
    return dataclasses.replace(config, chunk_size=int(chunk))


def note_one_chunk(config: TrainConfig, log) -> None:
    """Say so when a chunk holds a whole sequence: the run is then ordinary backprop, with none of the memory saved."""
    if config.method != "full" and config.chunk_size >= config.seq_len:
        log(f"note: --chunk-size {config.chunk_size} >= --seq-len {config.seq_len}: each sequence is a single chunk, so "
            f"{config.method} computes as ordinary backprop and saves no memory; a --chunk-size below --seq-len splits it")


def separate_reference(config: TrainConfig) -> bool:
    """True when a preference run loads a reference model of its own (not the LoRA model's disabled adapter)."""
    return getattr(OBJECTIVES[config.objective], "needs_reference", False) and (config.ref_model is not None or config.lora_r == 0)


def check_reference_config(config: TrainConfig, model_config) -> None:
    """--ref-model must read the trained model's token ids: compared from the configs, before any weight loads."""
    if config.ref_model is None:
        return
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    reference_vocab = (text_vocab(config, config.ref_model)
                       or getattr(load_model_config(config.ref_model).get_text_config(), "vocab_size", None))
    if None not in (vocab, reference_vocab) and vocab != reference_vocab:
        raise ValueError(
            f"--ref-model {config.ref_model}: the reference model's vocabulary has {reference_vocab} tokens, {config.model}'s "
            f"{vocab}; a reference must read the same token ids (use the same base model and tokenizer)"
        )




# ----- data, before the model loads -------------------------------------------------------------------


def tokenizer_for(config: TrainConfig):
    """The model's tokenizer: a preset's byte tokenizer on text data (`chunkwise.models.byte_tokenizer`), the
    demo's word tokenizer; None for the other presets on the synthetic task (it brings its own ids), and for a
    model without one on it."""
    if config.data == SYNTHETIC and config.model in PRESETS and config.model != DEMO_MODEL:
        return None
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
    if config.eval_fraction:
        train, _ = split_data(config)
        return sequences_from_records(train, tokenizer, seq_len=config.seq_len, packing=config.packing,
                                      response_separator=config.response_separator)
    return read_sequences(
        config.data, tokenizer, seq_len=config.seq_len, packing=config.packing, text_field=config.text_field,
        prompt_field=config.prompt_field, response_field=config.response_field, split=config.split, **_read_options(config),
    )


def _read_options(config: TrainConfig) -> dict:
    """The data-format options `--data` and `--eval-data` are both read with (besides fields, split, packing)."""
    return dict(messages_field=config.messages_field, response_separator=config.response_separator, glob=config.glob)


def split_data(config: TrainConfig) -> tuple[list, list]:
    """`--eval-fraction`: --data's documents split into (train, held out), the same on every call and rank (drawn with --seed)."""
    records = load_records(config.data, text_field=config.text_field, prompt_field=config.prompt_field,
                           response_field=config.response_field, messages_field=config.messages_field, split=config.split,
                           glob=config.glob)
    return hold_out(records, config.eval_fraction, seed=config.seed)


def held_out_rows(config: TrainConfig, tokenizer) -> HeldOutSet | None:
    """The `--eval-data` rows, or the documents `--eval-fraction` holds out of --data (None without either, or for
    the synthetic task's own stream). Read before the model loads, like the training data, so a problem in them is
    reported at once."""
    if not config.eval_every or (config.eval_data in (None, SYNTHETIC) and not config.eval_fraction):
        return None
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer, so --eval-data {config.eval_data} cannot be read; use a model folder with its tokenizer")
    if config.eval_fraction:
        train, held = split_data(config)
        rows = sequences_from_records(held, tokenizer, seq_len=config.seq_len, packing=config.packing,
                                      response_separator=config.response_separator)
        name = f"{config.data} ({len(held)} of {len(train) + len(held)} documents held out, --eval-fraction {config.eval_fraction:g})"
        return rows_held_out(name, rows, batch_size=config.batch_size, pad_token_id=pad_token_id(tokenizer))
    return file_held_out(
        config.eval_data, tokenizer, batch_size=config.batch_size, seq_len=config.seq_len, packing=config.packing,
        pad_token_id=pad_token_id(tokenizer), text_field=config.text_field, prompt_field=config.prompt_field,
        response_field=config.response_field, split=config.eval_split or config.split, **_read_options(config),
    )




# ----- the model, its objective, its engine -----------------------------------------------------------


def build_model(config: TrainConfig, device: torch.device):
    """The model to train: loaded (or built from a preset; quantized with --load-in-4bit/8bit), LoRA-wrapped
    unless lora_r=0, on `device` (a quantized base is loaded onto it: it cannot move afterwards)."""
    weights_dtype, autocast_dtype = training_dtypes(config.dtype, device, frozen_base=config.lora_r > 0)
    quantization = config.quantization()
    compute = quantization.compute_dtype(weights_dtype, autocast_dtype) if quantization.enabled else None
    model = load_causal_lm(config.model, dtype=weights_dtype, seed=config.seed, quantization=quantization,
                           compute_dtype=compute, device=device, vocab_size=text_vocab(config, config.model))
    if config.lora_r > 0:
        targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
        model = add_lora(model, rank=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=targets,
                         option="--lora-targets")
    return model if quantization.enabled else model.to(device)


def text_vocab(config: TrainConfig, name: str) -> int | None:
    """A tiny preset that reads text data is built with its byte tokenizer's 264 ids (`preset_text_vocab`); None:
    the model's own vocabulary (on the synthetic task a preset keeps its 128 ids)."""
    return None if config.data == SYNTHETIC else preset_text_vocab(name)


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
        quantization = config.quantization()  # a copy of a quantized base is quantized alike
        name = config.ref_model or config.model
        reference = load_causal_lm(name, dtype=weights_dtype, seed=config.seed, quantization=quantization, device=device,
                                   vocab_size=text_vocab(config, name))
        reference = (reference if quantization.enabled else reference.to(device)).eval()
        reference.requires_grad_(False)
    resolve_reference(reference, model, handle, owner="--ref-model")  # a wrong vocabulary fails now, not at step 1
    return cls(beta=config.beta, reference=reference)


def make_engine(config: TrainConfig, model: torch.nn.Module):
    """The engine of a seco/spaco run (None for --method full), built by `ChunkwiseConfig.make_engine`."""
    if config.method == "full":
        return None
    spaco = config.method == "spaco"
    engine = ChunkwiseConfig(method=config.method, chunk_size=config.chunk_size, attention=config.attention,
                             offload_kv=config.offload_kv, sampling=config.sampling, seed=config.seed,
                             budget=config.budget if spaco else None,
                             max_compensation=config.max_compensation if spaco else None)
    return engine.make_engine(model)
