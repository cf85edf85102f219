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
from pathlib import Path

import torch

from chunkwise import __version__
from chunkwise.core.config import ChunkwiseConfig
from chunkwise.core.objectives import OBJECTIVES, Objective
from chunkwise.core.reference import ADAPTER_DISABLED, resolve_reference
from chunkwise.data.preferences import read_preference_pairs
from chunkwise.data.sequences import canonical_packing, pad_token_id, read_sequences
from chunkwise.data.synthetic import SYNTHETIC
from chunkwise.models.loading import add_lora, check_position_limit, load_causal_lm, load_model_config, load_tokenizer
from chunkwise.plan import PlanError, describe_parts, plan_training_step
from chunkwise.recipes.run import RUN_FILE, is_run_directory, read_run_settings
from chunkwise.recipes.train.config import RESUMABLE_CHANGES, TrainConfig
from chunkwise.recipes.train.distributed import Distributed
from chunkwise.recipes.train.heldout import HeldOutSet, file_held_out
from chunkwise.utils.memory import format_bytes, parse_bytes
from chunkwise.utils.precision import training_dtypes

# ----- the run directory ------------------------------------------------------------------------------


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
    if saved.get("packing") is not None:  # a run started before `pack` became `concat` resumes as it trained
        saved = {**saved, "packing": canonical_packing(saved["packing"])}
    current = dataclasses.asdict(config)
    changed = [name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]]
    if changed:
        listing = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"--resume with different settings than the run in {output} was started with ({listing}); "
                         "resume with the same settings or start a new run")
    if saved.get("steps") != config.steps:
        log(f"note: --steps changed from {saved.get('steps')} to {config.steps}; the cosine schedule follows the new total")




# ----- what the model's config decides ---------------------------------------------------------------


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
            quantization=config.quantization(),
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




# ----- data, before the model loads -------------------------------------------------------------------


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




# ----- the model, its objective, its engine -----------------------------------------------------------


def build_model(config: TrainConfig, device: torch.device):
    """The model to train: loaded (or built from a preset; quantized with --load-in-4bit/8bit), LoRA-wrapped
    unless lora_r=0, on `device` (a quantized base is loaded onto it: it cannot move afterwards)."""
    weights_dtype, autocast_dtype = training_dtypes(config.dtype, device, frozen_base=config.lora_r > 0)
    quantization = config.quantization()
    compute = quantization.compute_dtype(weights_dtype, autocast_dtype) if quantization.enabled else None
    model = load_causal_lm(config.model, dtype=weights_dtype, seed=config.seed, quantization=quantization,
                           compute_dtype=compute, device=device)
    if config.lora_r > 0:
        targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
        model = add_lora(model, rank=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=targets,
                         option="--lora-targets")
    return model if quantization.enabled else model.to(device)


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
        reference = load_causal_lm(config.ref_model or config.model, dtype=weights_dtype, seed=config.seed, quantization=quantization,
                                   device=device)
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
