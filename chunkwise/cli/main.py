"""`chunkwise` command line: each subcommand maps to one plain, typed function.

    chunkwise verify --model tiny-llama --seq-len 256 --chunk-size 32
    chunkwise bench --lengths 1024,2048,4096 --output bench-results
    chunkwise plan --model meta-llama/Llama-3.1-8B --seq-len 32768 --memory 80GiB
    chunkwise train                      # the built-in demo; see `chunkwise train --help`
    chunkwise eval --model runs/chunkwise
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

from chunkwise.recipes.checkpoint import CheckpointError
from chunkwise.utils.memory import parse_bytes  # noqa: F401  (also `chunkwise bench`'s byte options)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Default pass/fail line per dtype. Differences from chunking are rounding only (Llama-like models show
# ~1e-15 in float64); a few models (Gemma family) compute norms in float32 even in float64 (~1e-7).
# A real bug (wrong shift, mask or position) shows up as an error of order 1e-2 to 1.
DEFAULT_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 1e-1}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, no stack trace (unless --debug)."""


def verify(
    *,
    model: str,
    seq_len: int,
    chunk_size: int,
    tolerance: float | None = None,
    dtype: str = "float64",
    device: str = "auto",
    batch_size: int = 1,
    lora_r: int = 0,
    seed: int = 0,
) -> int:
    """Compare SeCO's gradient with ordinary backprop on `model`; return 0 if within tolerance, else 1."""
    from rich.console import Console
    from rich.table import Table

    from chunkwise.models.loading import add_lora, load_causal_lm
    from chunkwise.recipes.verify import compare_gradients

    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    console = Console()
    if not console.is_terminal:  # piped or captured: don't fold parameter names to 80 columns
        console = Console(width=140)
    lm = load_causal_lm(model, dtype=DTYPES[dtype], seed=seed).to(device)
    if lora_r > 0:
        # LoRA starts with B = 0, where A's gradient is exactly zero and proves nothing: draw B.
        lm = add_lora(lm, rank=lora_r, random_b=0.02, seed=seed)
    report = compare_gradients(lm, seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size, seed=seed)

    num_chunks = math.ceil(seq_len / chunk_size)
    console.print(
        f"[bold]chunkwise verify[/]: {model} ({dtype}, {device}), batch {batch_size} x {seq_len} tokens, "
        f"chunk size {chunk_size} ({num_chunks} chunks){', LoRA r=' + str(lora_r) if lora_r else ''}"
    )
    console.print(f"loss: SeCO {report.loss_seco:.12g}   full backprop {report.loss_full:.12g}")
    table = Table(title="gradient difference, SeCO vs full backprop", title_justify="left")
    table.add_column("parameter group", overflow="fold", min_width=30)
    for column in ("tensors", "max abs diff", "max rel diff"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for group in report.groups:
        mark = "[green]ok[/]" if group.max_rel <= tolerance else "[red]FAIL[/]"
        table.add_row(group.group, str(group.num_tensors), f"{group.max_abs:.2e}", f"{group.max_rel:.2e}", mark)
    console.print(table)
    if report.max_rel <= tolerance:
        console.print(f"[green]PASS[/]: max relative difference {report.max_rel:.2e} <= tolerance {tolerance:.1e}")
        return 0
    console.print(f"[red]FAIL[/]: max relative difference {report.max_rel:.2e} > tolerance {tolerance:.1e}")
    return 1


def _chunk_size_option(text: str) -> int | str:
    """argparse type of --chunk-size: a number of tokens, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of tokens or auto, got {text!r}") from None


def _parse_list(text: str, option: str, convert=str) -> tuple:
    try:
        items = tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        items = ()
    if not items:
        example = {int: "1024,2048", float: "0,0.5,1"}.get(convert, "full,seco")
        raise UsageError(f"{option} must be a comma-separated list, e.g. {example}; got {text!r}")
    return items


def _lengths_option(text: str) -> tuple[int, ...]:
    """argparse type of `eval --seq-len`: one length, or several for the probes."""
    try:
        return _parse_list(text, "--seq-len", int)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def bench(
    *,
    model: str | None = None,
    methods: str = "forward,full,ckpt,seco,spaco",
    lengths: str | None = None,
    chunk_size: int | None = None,
    budget: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    lora_r: int = 0,
    batch_size: int = 1,
    repeats: int | None = None,
    warmup: int | None = None,
    output: str = "bench-results",
    quick: bool = False,
    max_memory: str | None = None,
    max_length: int | None = None,
    memory_cap: str | None = None,
    threads: int | None = None,
    case_timeout: float | None = None,
    seed: int = 0,
    attention: str = "chunkwise",
    offload_kv: bool = False,
    suite: str | None = None,
    dry_run: bool = False,
) -> int:
    """Benchmark step time and peak memory per method and length; write bench.md/json/png to `output`.

    With `suite="gpu"`: the one-shot GPU suite (`chunkwise.tools.gpu_suite`) instead, writing suite.json and
    suite.md to `output`; `dry_run` runs it on CPU with a tiny model.

    Returns 0 when every case ran or ran out of memory, 1 when a case failed otherwise.
    """
    if suite is not None:
        from chunkwise.tools.gpu_suite import run as run_suite

        return run_suite(output=output, dry_run=dry_run, device=None if device == "auto" else device)
    if dry_run:
        raise UsageError("--dry-run goes with --suite gpu")
    from chunkwise.tools.bench import DEFAULT_MODEL, BenchSettings, run_benchmark, write_outputs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    # --quick: a ~1M-parameter model on short sequences, the whole run in well under two minutes on
    # two CPU cores. Options given explicitly still win.
    settings = BenchSettings(
        model=model or ("quick" if quick else DEFAULT_MODEL),
        methods=_parse_list(methods, "--methods"),
        lengths=_parse_list(lengths or ("256,512,1024" if quick else "1024,2048,4096"), "--lengths", int),
        chunk_size=chunk_size or (64 if quick else 512),
        budget=budget,
        dtype=dtype,
        device=device,
        lora_r=lora_r,
        batch_size=batch_size,
        repeats=repeats or (2 if quick else 3),
        warmup=1 if warmup is None else warmup,
        memory_cap=None if memory_cap is None else parse_bytes(memory_cap, "--memory-cap"),
        max_memory=None if max_memory is None else parse_bytes(max_memory, "--max-memory"),
        max_length=max_length,
        # One thread for the quick model: its ops are too small to gain from threads, and a single
        # thread is not slowed down by other processes the way a waiting thread team is.
        threads=threads or (1 if quick else None),
        timeout_s=case_timeout,
        seed=seed,
        attention=attention,
        offload_kv=offload_kv,
    )
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
) -> int:
    """`chunkwise plan`: each method's predicted peak memory, from the model's config alone.

    Returns 0, or 1 when `seq_len` fits the budget with no method.
    """
    import json

    from chunkwise.models.presets import DEMO_MODEL
    from chunkwise.plan import Budget, ModelShape, Training, build_report, device_budget

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N (the device to plan for), got {device!r}")
    device_type = device.split(":")[0]
    precision = dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    lora_r = (0 if model == DEMO_MODEL else 8) if lora_r is None else lora_r
    targets = tuple(name.strip() for name in lora_targets.split(",") if name.strip())
    training = Training.from_precision(precision, device_type=device_type, lora_r=lora_r, lora_targets=targets,
                                       batch_size=batch_size, attention=attention)
    shape = ModelShape.from_name(model)
    if memory is not None:
        budget = Budget(parse_bytes(memory, "--memory"), "given by --memory")
    elif device_type == "cpu" or torch.cuda.is_available():
        budget = device_budget(torch.device(device))
    else:
        budget = None
    report = build_report(shape, training, seq_len=seq_len, chunk_size=None if chunk_size == "auto" else chunk_size, budget=budget)
    fits = report.budget is None or not report.plans or any(report.budget.admits(p, device_type) for p in report.plans)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        _print_plan(report, device)
    if not fits:
        print(f"chunkwise plan: {seq_len} tokens do not fit with any method: {report.budget.describe()}", file=sys.stderr)
    return 0 if fits else 1


def _print_plan(report, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from chunkwise.plan import LONGEST_SEARCH_LIMIT, describe_parts
    from chunkwise.utils.memory import format_bytes as format_bytes

    shape, training, budget = report.shape, report.training, report.budget

    def size(count: int | None) -> str:
        return format_bytes(count) if count else "–"

    trained = f"LoRA r={training.lora_r} on {','.join(training.lora_targets)}" if training.lora else "all parameters trained"
    console = Console(width=170)
    console.print(f"[bold]chunkwise plan[/]: {shape.name} ({shape.model_type}, {shape.parameters / 1e6:,.1f}M parameters, "
                  f"{trained}), {training.precision} on {device}, AdamW; batch {training.batch_size}")
    if report.plans:
        table = Table(title=f"predicted peak memory at {report.seq_len} tokens", title_justify="left")
        for column in ("method", "chunk", "weights", "gradients", "optimizer", "KV cache", "KV grad", "activations",
                       "logits+loss", "other", "peak", "host", "peak at", "fits"):
            table.add_column(column, justify="left" if column in ("method", "peak at") else "right")
        for plan in report.plans:
            parts = plan.parts
            fits = "–" if budget is None else ("yes" if budget.admits(plan, training.device_type) else "[red]no[/]")
            table.add_row(plan.method, str(plan.chunk_size or "–"), size(parts.get("weights", 0) + parts.get("weight_copies", 0)),
                          size(parts.get("gradients")), size(parts.get("optimizer")), size(parts.get("kv_cache")),
                          size(parts.get("kv_gradient")), size(parts.get("activations")), size(parts.get("logits_loss")),
                          size(parts.get("attention_backward", 0) + parts.get("optimizer_step", 0)), size(plan.peak),
                          size(plan.host), plan.phase, fits)
        console.print(table)
        console.print("Columns hold what is allocated at the peak: full and ckpt peak in the loss's backward, before any "
                      "gradient exists; \"other\" is the attention's backward over the past or AdamW's step; weights include "
                      "autocast's low-precision copies. Derivation and validation: docs/plan.md.")
    if budget is not None:
        console.print(f"budget: {budget.describe()}")
        if report.recommended is not None:
            plan = report.recommended
            offload = "needed (the KV cache does not fit beside the rest)" if plan.method == "seco+offload" else "not needed"
            console.print(f"recommended (--chunk-size auto): {plan.method} with {plan.chunk_size}-token chunks, peak "
                          f"{size(plan.peak)}; offload {offload}")
            console.print(f"  {describe_parts(plan)}")
        elif report.seq_len is not None:
            console.print(f"[red]{report.seq_len} tokens do not fit[/] with SeCO even with the KV cache offloaded")
        table = Table(title="longest sequence within the budget", title_justify="left")
        for column in ("method", "longest length", "chunk", "peak"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, plan in report.longest.items():
            if plan is None:
                table.add_row(method, "none", "–", "–")
            elif plan.seq_len >= LONGEST_SEARCH_LIMIT:  # the device part stopped growing: host memory decides
                table.add_row(method, f"≥ {plan.seq_len:,} (device flat)", str(plan.chunk_size or "–"), size(plan.peak))
            else:
                table.add_row(method, f"{plan.seq_len:,}", str(plan.chunk_size or "–"), size(plan.peak))
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


def train(given: dict) -> int:
    """`chunkwise train`: options the user gave override the run's saved settings (on --resume) or the defaults."""
    from chunkwise.recipes.run import is_run_directory, read_run_settings
    from chunkwise.recipes.train.recipe import TrainConfig, TrainingError
    from chunkwise.recipes.train.recipe import train as run_training

    output = given.get("output", TrainConfig.output)
    settings = {}
    if given.get("resume") and is_run_directory(Path(output).expanduser()):
        settings = {k: v for k, v in read_run_settings(Path(output).expanduser()).items() if k in TrainConfig.__dataclass_fields__}
        settings.update(resume=True, overwrite=False)
    settings.update(given)
    config = TrainConfig(**settings)
    try:
        result = run_training(config)
    except TrainingError as error:
        print(f"chunkwise train: {error}", file=sys.stderr)
        return 1
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


def evaluate(given: dict, *, as_json: bool) -> int:
    """`chunkwise eval`: score documents chunk by chunk and print a table (or JSON)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from chunkwise.recipes.evaluate import EvalConfig
    from chunkwise.recipes.evaluate import evaluate as run_evaluation
    from chunkwise.utils.memory import format_bytes

    task, depths, num_probes, output = (given.pop(name) for name in ("task", "depths", "num_probes", "output"))
    if task != "lm":
        return probe(given, task=task, depths=depths, num_probes=num_probes, output=output, as_json=as_json)
    if depths is not None or num_probes is not None or output is not None:
        raise UsageError("--depths, --num-probes and --output apply to --task passkey or needle")
    lengths = given.pop("seq_len")
    if lengths is not None and len(lengths) > 1:
        raise UsageError("--seq-len takes one length unless --task is passkey or needle")
    config = EvalConfig(**given, seq_len=lengths[0] if lengths else None)
    report = run_evaluation(config, log=lambda line: print(line, file=sys.stderr))
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    table = Table(title=f"chunkwise eval: {report.model} on {report.data}", title_justify="left")
    for column in ("documents", "tokens", "longest", "targets", "loss", "perplexity", "accuracy", "peak memory", "tokens/s"):
        table.add_column(column, justify="right")
    accuracy = f"{report.accuracy:.1%}" + (f" (chance {report.chance_accuracy:.1%})" if report.chance_accuracy else "")
    table.add_row(str(report.documents), f"{report.tokens:,}", f"{report.longest_document:,}", f"{report.targets:,}",
                  f"{report.loss:.4f}", f"{report.perplexity:.3f}", accuracy, format_bytes(report.peak_memory_bytes),
                  f"{report.tokens_per_s:,.0f}")
    Console(width=160).print(table)
    return 0


def probe(given: dict, *, task: str, depths: str | None, num_probes: int | None, output: str | None, as_json: bool) -> int:
    """`chunkwise eval --task passkey|needle`: accuracy per length × depth, a table, a heat map and JSON."""
    import json

    from rich.console import Console
    from rich.table import Table

    from chunkwise.recipes.probe import DEFAULT_DEPTHS, ProbeConfig, run_probes, write_report
    from chunkwise.utils.memory import format_bytes

    unused = [f"--{name.replace('_', '-')}" for name in ("data", "text_field", "prompt_field", "response_field")
              if given.get(name) not in (None, "text")] + (["--batch-size"] if given.get("batch_size") != 1 else [])
    if unused:
        raise UsageError(f"{', '.join(unused)} do not apply to --task {task}: probes are built from the model's tokenizer")
    config = ProbeConfig(
        model=given["model"], task=task, lengths=given["seq_len"] or (4096,),
        depths=_parse_list(depths, "--depths", float) if depths else DEFAULT_DEPTHS, num_probes=5 if num_probes is None else num_probes,
        chunk_size=given["chunk_size"], dtype=given["dtype"], device=given["device"], seed=given["seed"],
        allow_extrapolation=given["allow_extrapolation"],
    )
    report = run_probes(config, log=lambda line: print(line, file=sys.stderr))
    paths = write_report(report, Path(output or "probe-results"))
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    console = Console(width=160)
    console.print(f"[bold]chunkwise eval --task {task}[/]: {report.model} ({report.language} probes, {config.num_probes} per "
                  f"length and depth; chunks of {config.chunk_size}); accuracy:", highlight=False)
    table = Table()
    table.add_column("depth")
    for length in report.lengths:
        table.add_column(f"{length:,}", justify="right")
    for depth in report.depths:
        table.add_row(f"{depth:.0%}", *(f"{report.accuracy(length, depth):.0%}" for length in report.lengths))
    table.add_row("mean", *(f"{sum(report.accuracy(length, d) for d in report.depths) / len(report.depths):.0%}" for length in report.lengths))
    table.add_section()
    costs = {cost.length: cost for cost in report.costs}
    table.add_row("peak memory", *(format_bytes(costs[length].peak_memory_bytes) for length in report.lengths))
    table.add_row("  KV cache", *(format_bytes(costs[length].kv_cache_bytes) for length in report.lengths))
    table.add_row("  the rest", *(format_bytes(costs[length].other_bytes) for length in report.lengths))
    table.add_row("seconds", *(f"{costs[length].seconds:.1f}" for length in report.lengths))
    console.print(table)
    print(f"peak memory: above what was in use before each length's probes ({report.costs[0].memory_method}); wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkwise", description="Fine-tune long-context causal LMs chunk by chunk (SeCO / SpaCO)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "verify",
        help="check SeCO's gradient against ordinary backprop on a model",
        description="Compute one random batch's gradient with SeCO and with ordinary backprop, print the "
        "largest differences per parameter group, and exit 1 if any exceeds the tolerance.",
    )
    check.add_argument("--model", default="tiny-llama", help="local directory, hub id, or tiny preset (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral, tiny-gemma3)")
    check.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    check.add_argument("--chunk-size", type=int, default=32, help="tokens per chunk (default 32)")
    check.add_argument("--tolerance", type=float, default=None, help="largest relative difference that passes (default: 1e-6 float64, 1e-3 float32, 1e-1 bfloat16)")
    check.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="precision of both passes (default float64)")
    check.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    check.add_argument("--batch-size", type=int, default=1)
    check.add_argument("--lora-r", type=int, default=0, help="wrap the model in a LoRA adapter of this rank (0: full parameters)")
    check.add_argument("--seed", type=int, default=0)

    run = commands.add_parser(
        "bench",
        help="measure step time and peak memory of forward, full, ckpt, seco and spaco",
        description="Measure each (method, sequence length) case in a fresh process: median step time and "
        "peak memory above the loaded model. Writes bench.md (table), bench.json (raw numbers, machine) "
        "and bench.png (plots) to --output and prints the table. Models: quick, llama-56m (default), "
        "llama-1b, llama-8b (random weights from Llama configs), a tiny preset, or a local directory.",
    )
    run.add_argument("--model", default=None, help="benchmark model, tiny preset or local directory (default llama-56m; quick with --quick)")
    run.add_argument("--methods", default="forward,full,ckpt,seco,spaco", help="comma-separated subset of forward,full,ckpt,seco,spaco,spaco-est (SpaCO without the LM head on skipped chunks)")
    run.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 1024,2048,4096; 256,512,1024 with --quick)")
    run.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for seco/spaco (default 512; 64 with --quick)")
    run.add_argument("--budget", type=int, default=8, help="SpaCO chunks backpropagated per step, uniform sampling (default 8)")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"], default="auto", help="default: float32 on CPU, bfloat16 on CUDA")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank on q_proj/v_proj (0: all parameters)")
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--repeats", type=int, default=None, help="measured steps per case; the median is reported (default 3; 2 with --quick)")
    run.add_argument("--warmup", type=int, default=None, help="unmeasured steps before them (default 1)")
    run.add_argument("--output", default="bench-results", help="directory for bench.md, bench.json, bench.png")
    run.add_argument("--quick", action="store_true", help="tiny model, short lengths: a smoke run in well under two minutes")
    run.add_argument("--max-memory", default=None, metavar="BYTES", help="also find, per method, the longest sequence whose peak stays within BYTES above the loaded model (e.g. 2GiB)")
    run.add_argument("--max-length", type=int, default=None, help="with --max-memory: double the length no further than this")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default: one per core; 1 with --quick)")
    run.add_argument("--memory-cap", default=None, metavar="BYTES", help="fail a case (recorded as OOM) that allocates more than BYTES above its baseline")
    run.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS", help="give up on a case after this long (recorded as timeout)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--attention", choices=["chunkwise", "model"], default="chunkwise", help="seco/spaco attention: chunkwise (default; no repeated KV heads or mask kept for backward) or the model's own")
    run.add_argument("--offload-kv", action="store_true", help="seco/spaco: KV cache and its gradient in host memory")
    run.add_argument("--suite", choices=["gpu"], default=None, help="run the one-shot GPU suite (<= 8 minutes on one GPU; writes suite.json/suite.md to --output) instead of a grid; see docs/benchmarks.md")
    run.add_argument("--dry-run", action="store_true", help="with --suite gpu: the same cases on CPU with a tiny model, a smoke test")

    estimate = commands.add_parser(
        "plan",
        help="predict the peak memory of each method from the model's config (no weights loaded)",
        description="Predict a training step's peak memory for full backprop, layer checkpointing, SeCO, SpaCO and "
        "SeCO with the KV cache offloaded, broken into weights, gradients, optimizer state, KV cache and its "
        "gradient, activations and logits/loss. With --memory (or on this machine's device), also the chunk size "
        "--chunk-size auto would pick and the longest sequence each method fits. Only the config is read.",
    )
    estimate.add_argument("--model", required=True, help="hub id, local model folder, or tiny preset (only its config is read)")
    estimate.add_argument("--seq-len", type=int, default=None, help="tokens per sequence: the breakdown at this length")
    estimate.add_argument("--memory", default=None, metavar="BYTES", help="the device's memory, e.g. 24GiB: the longest length and the chunk that fit (default: this machine's free memory on --device, if it has one)")
    estimate.add_argument("--chunk-size", type=_chunk_size_option, default="auto", help="tokens per chunk for seco/spaco (default auto: the largest that fits, else 1024)")
    estimate.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"], default="auto", help="as chunkwise train runs it (auto: bfloat16 autocast on cuda, float32 on cpu)")
    estimate.add_argument("--device", default="auto", help="cuda or cpu: the device to plan for (default: cuda if this machine has one)")
    estimate.add_argument("--lora-r", type=int, default=None, help="LoRA rank; 0 = full fine-tuning (default 8, as chunkwise train with --model)")
    estimate.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names for LoRA (default q_proj,v_proj)")
    estimate.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    estimate.add_argument("--attention", choices=["chunkwise", "model"], default="chunkwise", help="the engines' attention (default chunkwise)")
    estimate.add_argument("--json", dest="as_json", action="store_true", help="print the plan as JSON")

    fit = commands.add_parser(
        "train",
        help="fine-tune a causal LM chunk by chunk (with no options: the built-in CPU demo)",
        description="Train with SeCO, SpaCO or ordinary backprop. Without --model and --data it trains a small "
        "Llama from scratch on a synthetic long-range recall task (2048-token sequences) on CPU in about two "
        "minutes. Writes metrics.jsonl, loss.png, checkpoints/ and model/ to --output.",
        argument_default=argparse.SUPPRESS,  # only options given on the command line override (see --resume)
    )
    fit.add_argument("--model", help="hub id, local directory, or tiny preset (default: the demo model, trained from scratch)")
    fit.add_argument("--data", help=".txt file or folder, .jsonl, .json/.csv/.parquet, a save_to_disk folder, a hub dataset, or 'synthetic' (default)")
    fit.add_argument("--output", help="run directory (default runs/chunkwise)")
    fit.add_argument("--method", choices=["seco", "spaco", "full"], help="seco (default, exact), spaco (sampled chunks), full (ordinary backprop)")
    fit.add_argument("--objective", choices=["cross-entropy", "dpo", "ipo", "simpo"], help="cross-entropy (default), or a preference objective on prompt/chosen/rejected data: dpo, ipo (against a reference model), simpo (reference-free)")
    fit.add_argument("--beta", type=float, help="preference objectives: beta (default 0.1; simpo 2.0)")
    fit.add_argument("--ref-model", help="dpo/ipo reference model: hub id, folder or preset (default: the base model with the LoRA adapter disabled; full fine-tuning: a frozen copy of --model)")
    fit.add_argument("--chosen-field", help="preference data: field with the preferred response (default chosen; the prompt is --prompt-field, default prompt)")
    fit.add_argument("--rejected-field", help="preference data: field with the dispreferred response (default rejected)")
    fit.add_argument("--chunk-size", type=_chunk_size_option, help="tokens per chunk, or auto: the largest that fits the device's free memory less 10%% (default 1024; demo 512)")
    fit.add_argument("--memory", metavar="BYTES", help="with --chunk-size auto: plan for this much memory (e.g. 24GiB) instead of the device's free memory")
    fit.add_argument("--budget", type=int, help="SpaCO: chunks backpropagated per step")
    fit.add_argument("--sampling", choices=["uniform", "bernoulli", "adaptive"], help="SpaCO chunk selection (default uniform; adaptive: decided in stage 2, docs/spaco.md)")
    fit.add_argument("--max-compensation", type=float, help="SpaCO: cap on the compensation factor (the paper: 2.0)")
    fit.add_argument("--attention", choices=["chunkwise", "model"], help="seco/spaco attention: chunkwise (default; less memory per token with SDPA models) or the model's own")
    fit.add_argument("--offload-kv", action="store_true", help="seco/spaco: keep the KV cache and its gradient in host memory (device memory stops growing with length)")
    fit.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096; demo 2048)")
    fit.add_argument("--batch-size", type=int, help="sequences (preference objectives: pairs) per micro-batch (default 1; demo 8)")
    fit.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    fit.add_argument("--steps", type=int, help="optimizer steps (default 1000; demo 400)")
    fit.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 2e-5 full; demo 1e-2)")
    fit.add_argument("--warmup-ratio", type=float, help="fraction of steps for linear warm-up before cosine decay (default 0.05)")
    fit.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    fit.add_argument("--adam-beta2", type=float, help="AdamW second-moment decay (default 0.999; demo 0.98)")
    fit.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    fit.add_argument("--seed", type=int, help="seed of the model init, data order, dropout and SpaCO sampling (default 0)")
    fit.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"], help="auto: bfloat16 autocast on a GPU that has it, else float32")
    fit.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    fit.add_argument("--lora-r", type=int, help="LoRA rank; 0 = full fine-tuning (default 8 with --model, 0 for the demo)")
    fit.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 x rank)")
    fit.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0)")
    fit.add_argument("--lora-targets", help="comma-separated module names for LoRA (default q_proj,v_proj)")
    fit.add_argument("--text-field", help="JSONL/dataset field with the text (default text)")
    fit.add_argument("--prompt-field", help="instruction data: field with the prompt (its tokens are not trained on)")
    fit.add_argument("--response-field", help="instruction data: field with the response")
    fit.add_argument("--split", help="dataset split (default train)")
    fit.add_argument("--packing", choices=["pack", "truncate"], help="pack documents into seq-len blocks (default for text) or truncate each (default for instruction data)")
    fit.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 100; 0: only at the end and on interruption)")
    fit.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 1)")
    fit.add_argument("--eval-every", type=int, help="held-out loss and accuracy every N steps, chunk by chunk (default 100 with --eval-data or on the demo, else 0)")
    fit.add_argument("--eval-data", help="held-out data in any --data format, read like --data; default: the synthetic task's held-out stream when training on it")
    fit.add_argument("--eval-split", help="split of the --eval-data dataset (default: --split), e.g. validation")
    fit.add_argument("--log-every", type=int, help="print a progress line every N steps when not on a terminal (default 10)")
    fit.add_argument("--max-bad-steps", type=int, help="stop after this many non-finite steps in a row (default 5)")
    fit.add_argument("--allow-extrapolation", action="store_true", help="allow --seq-len above the model's position limit")
    fit.add_argument("--zero", type=int, choices=[1, 2, 3], help="under torchrun: DeepSpeed ZeRO stage instead of DDP (1: optimizer state sharded, 2: gradients too, 3: parameters too; needs pip install 'chunkwise[deepspeed]')")
    fit.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP")
    fit.add_argument("--dist-timeout", type=float, help="under torchrun: seconds a rank waits for the others before stopping with an error (default 1800)")
    fit.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    fit.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    fit.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")

    score = commands.add_parser(
        "eval",
        help="perplexity and accuracy on long documents, chunk by chunk without autograd",
        description="Score documents with chunked no-grad inference through a KV cache: memory of one chunk's "
        "activations plus the cache, so documents far longer than a full forward allows can be scored. --model "
        "takes a run directory, a model or adapter folder, a hub id or a tiny preset.",
    )
    score.add_argument("--model", required=True, help="run directory, model/adapter folder, hub id or tiny preset")
    score.add_argument("--data", default=None, help="documents to score (as train --data); default: the run's data, else the synthetic task")
    score.add_argument("--seq-len", type=_lengths_option, default=None,
                       help="synthetic: tokens per sequence (default: the run's); files: at most this many tokens per document "
                       "(default: all); --task passkey/needle: comma-separated probe lengths (default 4096)")
    score.add_argument("--chunk-size", type=int, default=1024, help="tokens per inference chunk (default 1024)")
    score.add_argument("--batch-size", type=int, default=1)
    score.add_argument("--num-sequences", type=int, default=32, help="synthetic: held-out sequences (default 32)")
    score.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    score.add_argument("--device", default="auto")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--text-field", default="text")
    score.add_argument("--prompt-field", default=None)
    score.add_argument("--response-field", default=None)
    score.add_argument("--split", default="train")
    score.add_argument("--allow-extrapolation", action="store_true", help="score documents longer than the model's position limit")
    score.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    score.add_argument("--task", choices=["lm", "passkey", "needle"], default="lm",
                       help="lm (default): loss and perplexity of documents; passkey / needle: long-context retrieval probes "
                       "built with the model's tokenizer, prefilled chunk by chunk, answered greedily")
    score.add_argument("--depths", default=None, help="passkey/needle: comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    score.add_argument("--num-probes", type=int, default=None, help="passkey/needle: probes per length and depth (default 5)")
    score.add_argument("--output", default=None, help="passkey/needle: folder for <task>.png (heat map) and <task>.json (default probe-results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft calls a transformers API that transformers has deprecated; the warning is not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
    try:
        if args.command == "verify":
            return verify(**options)
        if args.command == "bench":
            return bench(**options)
        if args.command == "train":
            return train(options)
        if args.command == "plan":
            return plan(**options)
        if args.command == "eval":
            as_json = options.pop("as_json")
            return evaluate(options, as_json=as_json)
    except KeyboardInterrupt:
        # A second Ctrl-C during training (the first one asks for a checkpoint and a clean stop).
        print(f"chunkwise {args.command}: stopped by Ctrl-C; the last complete checkpoint, if any, is intact", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, CheckpointError) as error:
        if args.debug:
            raise
        print(f"chunkwise {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 2

