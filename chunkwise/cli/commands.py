"""The `chunkwise` subcommands, each a plain function of the parsed options: verify, bench, plan, train, eval, export.

Heavy imports (torch, models, the planner, the benchmark harness) happen inside the command that needs them,
after its plain arguments are checked, so `chunkwise --help` and a mistyped option answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from chunkwise.cli import environment
from chunkwise.cli.options import UsageError, parse_list
from chunkwise.cli.tables import print_evaluation, print_plan, print_probes, print_verify
from chunkwise.utils.sizes import parse_bytes

DTYPES = ("float64", "float32", "bfloat16")  # `verify --dtype`: names of torch dtypes
# Default pass/fail line per dtype. Differences from chunking are rounding only (Llama-like models show
# ~1e-15 in float64); a few models (Gemma family) compute norms in float32 even in float64 (~1e-7).
# A real bug (wrong shift, mask or position) shows up as an error of order 1e-2 to 1.
DEFAULT_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 1e-1}


def default_device(device: str) -> str:
    """--device auto: cuda if this machine has one, else cpu."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def with_quantization(options: dict) -> dict:
    """`options` with the quantization options given (--load-in-4bit, ...) gathered into `quantization`."""
    from chunkwise.models.quantize import QUANTIZATION_FIELDS, Quantization

    given = {name: options.pop(name) for name in QUANTIZATION_FIELDS if name in options}
    return {**options, "quantization": Quantization(**given)}


def verify(*, model: str, seq_len: int, chunk_size: int, tolerance: float | None = None, dtype: str = "float64", device: str = "auto",
           batch_size: int = 1, lora_r: int = 0, seed: int = 0, quantization=None) -> int:
    """Compare SeCO's gradient with ordinary backprop on `model`; return 0 if within tolerance, else 1.

    `model`: a preset, a model folder, a hub id, or a run directory (its final model or latest checkpoint, a LoRA
    adapter's gradient checked as trained).
    """
    from chunkwise.models.quantize import NO_QUANTIZATION, check_quantized_training
    from chunkwise.recipes.run import check_model_argument

    quantization = quantization or NO_QUANTIZATION
    check_quantized_training(quantization, lora_rank=lora_r)
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}")
    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be a positive integer (tokens per chunk), got {chunk_size}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    check_model_argument(model)
    environment.torch_ready()

    from chunkwise.recipes.verify import compare_gradients

    device = default_device(device)
    lm = _verify_model(model, dtype=dtype, device=device, seed=seed, lora_r=lora_r, quantization=quantization)
    report = compare_gradients(lm, seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size, seed=seed)
    passed = print_verify(report, model=model, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len,
                          chunk_size=chunk_size, lora_r=lora_r, tolerance=tolerance)
    return 0 if passed else 1


def _verify_model(model: str, *, dtype: str, device: str, seed: int, lora_r: int, quantization):
    """The model `verify` checks, in `dtype` on `device`: a run's trained model (adapter trainable), else `model` loaded
    (or built from a preset with `seed`), with a LoRA adapter of rank `lora_r` if asked."""
    import torch

    from chunkwise.core.handle import unwrap_causal_lm
    from chunkwise.core.quantized import is_quantized
    from chunkwise.models.loading import add_lora, load_causal_lm
    from chunkwise.recipes.run import is_adapter_folder, is_run_directory, load_trained_model, model_folder_of_run

    weights = getattr(torch, dtype)
    compute = quantization.compute_dtype(weights, None) if quantization.enabled else None
    folder = Path(model).expanduser()
    if is_run_directory(folder):
        if lora_r > 0 and is_adapter_folder(model_folder_of_run(folder)):
            raise UsageError(f"--lora-r: the run in {model} trained a LoRA adapter, whose gradient verify checks as it is; drop --lora-r")
        lm, _, _ = load_trained_model(model, dtype=weights, quantization=quantization if quantization.enabled else None,
                                      compute_dtype=compute, device=device, trainable=True)
    elif quantization.enabled:  # loaded onto the device (a quantized model cannot move afterwards)
        lm = load_causal_lm(model, dtype=weights, seed=seed, quantization=quantization, compute_dtype=compute, device=device)
    else:
        lm = load_causal_lm(model, dtype=weights, seed=seed)
    if not is_quantized(unwrap_causal_lm(lm)):  # a quantized base was loaded onto the device and cannot move
        lm = lm.to(device)
    if lora_r > 0:
        # LoRA starts with B = 0, where A's gradient is exactly zero and proves nothing: draw B.
        lm = add_lora(lm, rank=lora_r, random_b=0.02, seed=seed)
    return lm


def bench_command(options: dict) -> int:
    """`chunkwise bench`: the one-shot GPU suite with --suite gpu, else a grid of cases (`bench`)."""
    output, suite, dry_run, quick = (options.pop(name) for name in ("output", "suite", "dry_run", "quick"))
    if suite is not None:
        from chunkwise.tools.gpu_suite import run as run_suite

        return run_suite(output=output, dry_run=dry_run, device=None if options["device"] == "auto" else options["device"])
    if dry_run:
        raise UsageError("--dry-run goes with --suite gpu")
    return bench(bench_settings(options, quick=quick), output=output)


def bench_settings(options: dict, *, quick: bool = False):
    """The `BenchSettings` the parsed options describe: each option whose name is a field of BenchSettings sets it.

    --quick: a ~1M-parameter model on short sequences, the whole run in well under two minutes on two CPU
    cores; options given explicitly still win.
    """
    from chunkwise.tools.bench import DEFAULT_MODEL, BenchSettings

    device = default_device(options["device"])
    values = {
        **options, "device": device,
        "dtype": options["dtype"] if options["dtype"] != "auto" else ("bfloat16" if device.startswith("cuda") else "float32"),
        "model": options["model"] or ("quick" if quick else DEFAULT_MODEL),
        "methods": parse_list(options["methods"], "--methods"),
        "lengths": _bench_lengths(options, quick),
        "chunk_size": options["chunk_size"] or (64 if quick else 512),
        "repeats": options["repeats"] or (2 if quick else 3),
        "warmup": 1 if options["warmup"] is None else options["warmup"],
        "memory_cap": None if options["memory_cap"] is None else parse_bytes(options["memory_cap"], "--memory-cap"),
        "max_memory": None if options["max_memory"] is None else parse_bytes(options["max_memory"], "--max-memory"),
        # One thread for the quick model: its ops are too small to gain from threads, and a single
        # thread is not slowed down by other processes the way a waiting thread team is.
        "threads": options["threads"] or (1 if quick else None),
    }
    return BenchSettings(**{field.name: values[field.name] for field in dataclasses.fields(BenchSettings) if field.name in values})


def _bench_lengths(options: dict, quick: bool) -> tuple[int, ...]:
    """--lengths, else the packed row's length with --documents, else the default grid."""
    documents = options.get("documents")
    if options["lengths"] is None and documents is not None:
        return (sum(documents),)
    lengths = parse_list(options["lengths"] or ("256,512,1024" if quick else "1024,2048,4096"), "--lengths", int)
    if documents is not None and set(lengths) != {sum(documents)}:
        raise UsageError(f"--documents make a row of {sum(documents)} tokens; leave out --lengths or give that length")
    return lengths


def bench(settings, *, output: str) -> int:
    """Benchmark step time and peak memory per method and length (a `BenchSettings`); write bench.md/json/png to `output`.

    Returns 0 when every case ran or ran out of memory, 1 when a case failed otherwise.
    """
    from chunkwise.tools.bench import run_benchmark, write_outputs

    report = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_outputs(report, Path(output))
    print(paths["table"].read_text(), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    probes = [p for search in report.searches for p in search.probes]
    failed = [r for r in report.results + probes if r.status in ("error", "timeout")]
    for result in failed:
        print(f"{result.case.method} @ {result.case.seq_len}: {result.status}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def plan(
    *,
    model: str,
    seq_len: int | None = None,
    memory: str | None = None,
    chunk_size: int | str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    lora_r: int | None = None,
    lora_targets: str = "q_proj,v_proj",
    batch_size: int = 1,
    attention: str = "chunkwise",
    as_json: bool = False,
    quantization=None,
    documents: tuple[int, ...] | None = None,
    budget: int = 8,
) -> int:
    """`chunkwise plan`: each method's predicted peak memory, from the model's config alone.

    Returns 0, or 1 when `seq_len` fits the budget with no method.
    """
    import torch

    from chunkwise.models.presets import DEMO_MODEL
    from chunkwise.plan import Budget, ModelShape, Training, build_report, device_budget

    # Without a GPU here, plan for the GPU the model will train on (what users plan for), not for this CPU.
    gpu_elsewhere = device == "auto" and not torch.cuda.is_available()
    device = "cuda" if gpu_elsewhere else default_device(device)
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N (the device to plan for), got {device!r}")
    device_type = device.split(":")[0]
    precision = dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    lora_r = (0 if model == DEMO_MODEL else 8) if lora_r is None else lora_r
    targets = tuple(name.strip() for name in lora_targets.split(",") if name.strip())
    options = {} if quantization is None else {"quantization": quantization}
    training = Training.from_precision(precision, device_type=device_type, lora_r=lora_r, lora_targets=targets,
                                       batch_size=batch_size, attention=attention, **options)
    shape = ModelShape.from_name(model)
    if memory is not None:
        memory_budget = Budget(parse_bytes(memory, "--memory"), "given by --memory")
    elif device_type == "cpu" or torch.cuda.is_available():
        memory_budget = device_budget(torch.device(device))
    else:
        memory_budget = None
    if budget < 1:
        raise UsageError(f"--budget must be at least 1 chunk, got {budget}")
    report = build_report(shape, training, seq_len=seq_len, chunk_size=None if chunk_size == "auto" else chunk_size, budget=memory_budget,
                          documents=documents, spaco_budget=budget)
    if gpu_elsewhere:  # said once the plan is made, so that a bad setting stays a one-line error
        print("chunkwise plan: no GPU on this machine: planning for a CUDA GPU (bfloat16 autocast; give its size with "
              "--memory); pass --device cpu to plan for this machine's CPU (float32)", file=sys.stderr)
    fits = report.budget is None or not report.plans or any(report.budget.admits(p, device_type) for p in report.plans)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_plan(report, device)
    if not fits:
        print(f"chunkwise plan: {report.seq_len} tokens do not fit with any method: {report.budget.describe()}", file=sys.stderr)
    return 0 if fits else 1


def export(*, model: str, output: str, dtype: str = "float32") -> int:
    """`chunkwise export`: merge a run's LoRA adapter into its base and save a plain transformers folder."""
    import torch

    from chunkwise.recipes.export import export_model

    result = export_model(model, output, dtype=getattr(torch, dtype))
    what = "LoRA adapter merged into its base" if result.merged else "model saved as it was (no adapter to merge)"
    print(f"chunkwise export: {model}: {what}; {result.parameters:,} parameters in {dtype}"
          f"{', with its tokenizer' if result.tokenizer else ', no tokenizer'} -> {result.output}\n"
          f"load it with AutoModelForCausalLM.from_pretrained({str(result.output)!r})")
    return 0


def train(given: dict) -> int:
    """`chunkwise train`: options the user gave override the run's saved settings (on --resume) or the defaults."""
    from chunkwise.recipes.run import is_run_directory, read_run_settings
    from chunkwise.recipes.train.config import TrainConfig, TrainingError
    from chunkwise.recipes.train.preflight import preflight

    output = given.get("output", TrainConfig.output)
    settings = {}
    if given.get("resume") and is_run_directory(Path(output).expanduser()):
        settings = {k: v for k, v in read_run_settings(Path(output).expanduser()).items() if k in TrainConfig.__dataclass_fields__}
        settings.update(resume=True, overwrite=False)
    settings.update(given)
    config = TrainConfig(**settings)
    preflight(config)  # every setting and local path, before torch and transformers are imported (seconds)
    environment.torch_ready()
    from chunkwise.recipes.train.recipe import train as run_training

    try:
        result = run_training(config, log=environment.hinted(print))
    except TrainingError as error:
        print(f"chunkwise train: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank has the result; one prints it
        _print_summary(result)
    return 128 + int(result.interrupted) if result.interrupted else 0  # the shell's code for "killed by signal"


def _print_summary(result) -> None:
    if result.first_loss is None:
        return
    print(f"loss: {result.first_loss:.4f} at the first step -> {result.last_loss:.4f} at step {result.step}"
          + (f" ({result.skipped_steps} steps skipped: non-finite)" if result.skipped_steps else ""))
    if result.evaluations:
        from chunkwise.recipes.train.heldout import best_evaluation

        first, last, best = result.evaluations[0], result.evaluations[-1], best_evaluation(result.evaluations)
        chance = f" (chance {last['chance']:.1%})" if "chance" in last else ""
        print(f"held-out accuracy: {first['accuracy']:.1%} at step {first['step']} -> {last['accuracy']:.1%} at step "
              f"{last['step']}{chance}; held-out loss {first['loss']:.4f} -> {last['loss']:.4f}")
        if best is not None:
            print(f"best held-out loss: {best['loss']:.4f} (perplexity {best['perplexity']:.3f}) at step {best['step']}")


def evaluate(given: dict) -> int:
    """`chunkwise eval`: score documents chunk by chunk and print a table (or JSON)."""
    as_json = given.pop("as_json")
    from chunkwise.recipes.evaluate import EvalConfig, check_settings
    from chunkwise.recipes.evaluate import evaluate as run_evaluation

    task, depths, num_probes, output = (given.pop(name) for name in ("task", "depths", "num_probes", "output"))
    if task != "lm":
        from chunkwise.models.quantize import QUANTIZATION_FIELDS

        asked = [name for name in QUANTIZATION_FIELDS if name in given]
        if asked:
            raise UsageError(f"--{asked[0].replace('_', '-')} applies to --task lm; probes load a run's base as it was trained")
        if given.pop("pair_depth") is not None:
            raise UsageError("--pair-depth places the synthetic task's pairs (--task lm); the probes place their needles with --depths")
        return probe(given, task=task, depths=depths, num_probes=num_probes, output=output, as_json=as_json)
    if depths is not None or num_probes is not None or output is not None:
        raise UsageError("--depths, --num-probes and --output apply to --task passkey or needle")
    lengths = given.pop("seq_len")
    if lengths is not None and len(lengths) > 1:
        raise UsageError("--seq-len takes one length unless --task is passkey or needle")
    config = EvalConfig(**given, seq_len=lengths[0] if lengths else None)
    check_settings(config)
    environment.torch_ready()
    report = run_evaluation(config, log=environment.hinted(lambda line: print(line, file=sys.stderr)))
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    print_evaluation(report)
    return 0


def probe(given: dict, *, task: str, depths: str | None, num_probes: int | None, output: str | None, as_json: bool) -> int:
    """`chunkwise eval --task passkey|needle`: accuracy per length × depth, a table, a heat map and JSON."""
    from chunkwise.recipes.probe import DEFAULT_DEPTHS, ProbeConfig, run_probes, write_report

    data_options = ("data", "text_field", "prompt_field", "response_field", "messages_field", "response_separator", "glob")
    unused = [f"--{name.replace('_', '-')}" for name in data_options if given.get(name) not in (None, "text")]
    unused += ["--batch-size"] if given.get("batch_size") != 1 else []
    if unused:
        raise UsageError(f"{', '.join(unused)} do not apply to --task {task}: probes are built from the model's tokenizer")
    environment.torch_ready()
    config = ProbeConfig(
        model=given["model"], task=task, lengths=given["seq_len"] or (4096,),
        depths=parse_list(depths, "--depths", float) if depths else DEFAULT_DEPTHS, num_probes=5 if num_probes is None else num_probes,
        chunk_size=given["chunk_size"], dtype=given["dtype"], device=given["device"], seed=given["seed"],
        allow_extrapolation=given["allow_extrapolation"],
    )
    report = run_probes(config, log=environment.hinted(lambda line: print(line, file=sys.stderr)))
    paths = write_report(report, Path(output or "probe-results"))
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    print_probes(report, task=task, num_probes=config.num_probes, chunk_size=config.chunk_size)
    print(f"peak memory: above what was in use before each length's probes ({report.costs[0].memory_method}); wrote {', '.join(str(p) for p in paths.values())}")
    return 0
