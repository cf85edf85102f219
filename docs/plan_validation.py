"""Compare `chunkwise plan`'s predicted peaks with the peaks `chunkwise bench` measured (docs/plan.md).

    python docs/plan_validation.py models /tmp/plan-models         # write the two local models the runs use
    chunkwise bench ... --output docs/bench/plan-<case>            # the commands in docs/plan.md
    python docs/plan_validation.py autocast ... --output docs/bench/plan-<case>   # bench's cases under bf16 autocast
    python docs/plan_validation.py table docs/bench/plan-*         # predicted vs measured, as Markdown
    MALLOC_MMAP_THRESHOLD_=16384 MALLOC_TRIM_THRESHOLD_=0 python docs/plan_validation.py workspace quick 128
    python docs/plan_validation.py code-pages /tmp/plan-models/mistral-w512 seco 1024 --chunk-size 256

The bench measures a step's peak above the loaded model (no optimizer: it only runs backward), so the
prediction compared is the plan without optimizer state, less the weights; on a CPU an offloaded KV
cache lives in the same memory, so it is added back. `chunkwise bench` has no autocast option: the
`autocast` command runs the bench's own cases (`chunkwise.tools.bench.runner.run_case`, a fresh process each, the
bench's malloc settings) with the whole case inside one bfloat16 autocast region. Autocast's cached
weight copies are then made by the bench's priming step and sit in the baseline, so they are left out
of the prediction compared too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chunkwise.plan import ModelShape, Training, method_plan
from chunkwise.utils.memory import MiB

# The local models of the validation: shapes the bench's Llama presets do not cover.
LOCAL_MODELS = {
    # Qwen3: q/k norms, head_dim 64 x 8 heads = 512 != hidden 256, tied embeddings.
    "qwen3-8m": ("Qwen3Config", dict(vocab_size=16384, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                                     max_position_embeddings=131072)),
    # Mistral with a 512-token sliding window: beyond it every layer takes SDPA with a mask.
    "mistral-w512": ("MistralConfig", dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                           num_attention_heads=8, num_key_value_heads=2, sliding_window=512,
                                           tie_word_embeddings=False, max_position_embeddings=131072)),
}


def local_config(name: str):
    import transformers

    class_name, fields = LOCAL_MODELS[name]
    return getattr(transformers, class_name)(**fields)


def make_models(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    for name in LOCAL_MODELS:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(local_config(name)).save_pretrained(folder / name)
        print(f"wrote {folder / name}")


def shape_of(model: str) -> ModelShape:
    from chunkwise.models.presets import BENCH_MODELS, bench_config

    if model in BENCH_MODELS:
        return ModelShape.from_config(bench_config(model), name=model)
    if Path(model).name in LOCAL_MODELS:
        return ModelShape.from_config(local_config(Path(model).name), name=Path(model).name)
    return ModelShape.from_name(model)


def spaco_selection(case: dict, num_chunks: int) -> str:
    """The chunks SpaCO backpropagated in the measured step: the draw after the warmup steps' of a sampler
    seeded as the bench's engine is (the bench measures one step)."""
    if case["method"] != "spaco" or case["repeats"] != 1:
        return ""
    from chunkwise.core.sampling import make_sampler

    sampler = make_sampler("uniform", budget=case["budget"], max_compensation=None, seed=case["seed"])
    for _ in range(case["warmup"] + 1):
        chunks = sampler.select(num_chunks).chunks
    return f"chunks {', '.join(map(str, chunks))} of {num_chunks}"


def rows(report: dict) -> list[dict]:
    """Predicted vs measured for every case of one bench.json."""
    settings = report["settings"]
    autocast = report.get("autocast") == "bfloat16"
    # float32 weights; under autocast, float32 trained weights and (LoRA) a bfloat16 frozen base
    expected = "bfloat16" if autocast and settings["lora_r"] else "float32"
    if settings["device"] != "cpu" or settings["dtype"] != expected:
        raise SystemExit(f"only CPU float32 runs (and bf16 autocast ones written by `autocast`) are compared here, "
                         f"got {settings['device']} {settings['dtype']}")
    shape = shape_of(settings["model"])
    training = Training.from_precision("bfloat16" if autocast else "float32", device_type="cpu", lora_r=settings["lora_r"],
                                       batch_size=settings["batch_size"], attention=settings["attention"], optimizer_states=0)
    out = []
    for result in report["results"]:
        case = result["case"]
        if result["status"] != "ok" or case["method"] not in ("full", "ckpt", "seco", "spaco"):
            continue
        method = "seco+offload" if case["method"] == "seco" and case["offload_kv"] else case["method"]
        plan = method_plan(shape, training, method, seq_len=case["seq_len"], chunk_size=case["chunk_size"])
        predicted = plan.total("cpu") - plan.parts.get("weights", 0) - plan.parts.get("weight_copies", 0)
        measured = result["peak_memory_bytes"]
        variant = ", ".join(filter(None, [("bf16 autocast" + (", cold" if report.get("cold") else "")) if autocast else "",
                                          f"LoRA r={settings['lora_r']}" if settings["lora_r"] else "",
                                          "attention=model" if settings["attention"] == "model" else "",
                                          "offload" if case["offload_kv"] else "",
                                          f"batch {case['batch_size']}" if case["batch_size"] > 1 else "",
                                          spaco_selection(case, result["num_chunks"])]))
        out.append(dict(model=shape.name, variant=variant, method=method, seq_len=case["seq_len"],
                        chunk=plan.chunk_size, phase=plan.phase, predicted=predicted, measured=measured,
                        error=predicted / measured - 1))
    return out


def table(paths: list[Path]) -> str:
    lines = ["| model | variant | method | length | chunk | predicted (MiB) | measured (MiB) | error | peak at |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    errors = []
    for path in paths:
        for row in rows(json.loads((path / "bench.json").read_text())):
            errors.append(row["error"])
            lines.append(f"| {row['model']} | {row['variant'] or '–'} | {row['method']} | {row['seq_len']} | {row['chunk'] or '–'} "
                         f"| {row['predicted'] / MiB:.1f} | {row['measured'] / MiB:.1f} | {row['error']:+.1%} | {row['phase']} |")
    worst = max(errors, key=abs)
    lines += ["", f"{len(errors)} cases; largest error {worst:+.1%}; {sum(abs(e) <= 0.10 for e in errors)} within ±10%."]
    return "\n".join(lines)


def measure_autocast(args: argparse.Namespace) -> None:
    """Run `chunkwise bench`'s cases under bfloat16 autocast and write bench.json / bench.md to `args.output`."""
    from dataclasses import asdict

    from chunkwise.tools.bench.case import BenchSettings
    from chunkwise.tools.bench.report import BenchReport, markdown_table
    from chunkwise.tools.bench.runner import describe_machine, run_case

    settings = BenchSettings(model=args.model, methods=tuple(args.methods.split(",")), lengths=tuple(map(int, args.lengths.split(","))),
                             chunk_size=args.chunk_size, budget=args.budget, dtype="bfloat16" if args.lora_r else "float32",
                             lora_r=args.lora_r, batch_size=args.batch_size, repeats=1, warmup=0, threads=1, seed=args.seed,
                             offload_kv=args.offload_kv)
    results = []
    for length in settings.lengths:
        for method in settings.methods:
            case = settings.case(method, length)
            child = [sys.executable, __file__, "autocast-case", json.dumps(asdict(case)), *(["--cold"] if args.cold else [])]
            results.append(run_case(case, command=child))
            peak = results[-1].peak_memory_bytes
            print(f"{method:>7} @ {length:>6} tokens: {results[-1].status}, peak "
                  f"{'–' if peak is None else f'+{peak / MiB:.1f} MiB'}{results[-1].error or ''}", flush=True)
    report = BenchReport(describe_machine("cpu"), settings, results)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench.json").write_text(json.dumps({**report.to_dict(), "autocast": "bfloat16", "cold": args.cold}, indent=2) + "\n")
    (args.output / "bench.md").write_text(f"Every step under torch.autocast(\"cpu\", dtype=torch.bfloat16){'' if args.cold else ', after one unmeasured step of the case before the baseline'}.\n\n"
                                          + markdown_table(report))


def autocast_case(case_json: str, *, cold: bool) -> None:
    """The child of `measure_autocast`: one bench case, inside one bfloat16 autocast region.

    Unless `cold`, the model runs one step of the case itself before the bench takes its baseline: the
    bfloat16 CPU kernels (oneDNN) keep a cache per problem shape, library memory that grows with each new
    shape and is never freed (10-15 MiB on `quick` at 512 tokens), which the planner does not count.
    """
    import torch

    from chunkwise.tools.bench.case import RESULT_MARKER, BenchCase
    from chunkwise.tools.bench.measure import build_case_model, make_step, measure_case

    def warmed(case: BenchCase, device: torch.device) -> torch.nn.Module:
        model = build_case_model(case, device)
        vocab = model.get_input_embeddings().num_embeddings
        make_step(case, model)(torch.randint(0, vocab, (case.batch_size, case.seq_len), device=device))
        model.zero_grad(set_to_none=True)
        return model

    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = measure_case(BenchCase(**json.loads(case_json)), build=build_case_model if cold else warmed)
    print(RESULT_MARKER + json.dumps(result.to_dict()), flush=True)


def lm_head_workspace(model: str, tokens: int) -> str:
    """Resident memory the LM head's matmul takes beyond its output, measured as the bench measures.

    Run in a fresh process with `chunkwise.tools.bench.runner.child_environment()`'s malloc settings: the part above
    the output is BLAS's packing buffer, which the planner does not count.
    """
    import torch

    from chunkwise.utils.memory import CpuMemory

    torch.set_num_threads(1)
    shape = shape_of(model)
    hidden, weight = torch.randn(tokens, shape.hidden), torch.randn(shape.vocab, shape.hidden)
    torch.nn.functional.linear(hidden[:16], weight)  # the priming step's size
    meter = CpuMemory()
    base = meter.current()
    meter.reset_peak()
    logits = torch.nn.functional.linear(hidden, weight)
    extra = meter.peak() - base - logits.nbytes
    return f"{shape.name}: {tokens} x {shape.hidden} @ {shape.hidden} x {shape.vocab}: {extra / MiB:.1f} MiB beyond the output"


def code_pages(model: str, method: str, seq_len: int, chunk_size: int) -> str:
    """Library code and data the bench's measured step pages in (resident file-backed memory, RssFile):
    part of the bench's peak, not a tensor. Measured like a bench case (same priming step and baseline)."""
    import torch

    from chunkwise.tools.bench.case import BenchCase, CaseResult
    from chunkwise.tools.bench.measure import build_case_model, measure_on
    from chunkwise.utils.memory import CpuMemory

    class FileBacked(CpuMemory):
        def current(self) -> int:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))

        def peak(self) -> int:  # file pages stay resident once touched
            return self.current()

    case = BenchCase(method=method, seq_len=seq_len, model=model, chunk_size=chunk_size, repeats=1, warmup=0, threads=1)
    result = CaseResult(case, "ok")
    measure_on(build_case_model(case, torch.device("cpu")), case, FileBacked(), result)
    return f"{Path(model).name} {method} @ {seq_len}: {result.peak_memory_bytes / MiB:.1f} MiB of library pages during the measured step"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models").add_argument("folder", type=Path)
    commands.add_parser("table").add_argument("runs", type=Path, nargs="+")
    workspace = commands.add_parser("workspace")
    workspace.add_argument("model")
    workspace.add_argument("tokens", type=int)
    pages = commands.add_parser("code-pages")
    pages.add_argument("model")
    pages.add_argument("method")
    pages.add_argument("seq_len", type=int)
    pages.add_argument("--chunk-size", type=int, default=512)
    autocast = commands.add_parser("autocast", help="chunkwise bench's cases with every step under bfloat16 autocast")
    autocast.add_argument("--model", required=True)
    autocast.add_argument("--methods", required=True, help="comma-separated: full, ckpt, seco, spaco")
    autocast.add_argument("--lengths", required=True, help="comma-separated sequence lengths")
    autocast.add_argument("--chunk-size", type=int, default=512)
    autocast.add_argument("--budget", type=int, default=2)
    autocast.add_argument("--lora-r", type=int, default=0, help="LoRA on q/v over a bfloat16 base (0: float32 weights, all trained)")
    autocast.add_argument("--batch-size", type=int, default=1)
    autocast.add_argument("--seed", type=int, default=0)
    autocast.add_argument("--cold", action="store_true", help="no step of the case before the bench's baseline (see autocast_case)")
    autocast.add_argument("--offload-kv", action="store_true")
    autocast.add_argument("--output", type=Path, required=True)
    autocast_child = commands.add_parser("autocast-case")
    autocast_child.add_argument("case")
    autocast_child.add_argument("--cold", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "models":
        make_models(args.folder)
    elif args.command == "autocast":
        measure_autocast(args)
    elif args.command == "autocast-case":
        autocast_case(args.case, cold=args.cold)
    elif args.command == "code-pages":
        print(code_pages(args.model, args.method, args.seq_len, args.chunk_size))
    elif args.command == "workspace":
        print(lm_head_workspace(args.model, args.tokens))
    else:
        print(table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
