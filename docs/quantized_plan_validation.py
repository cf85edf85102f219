"""Predicted vs measured peak of a SeCO step on a 4-bit (nf4) base with LoRA, on CPU (docs/quantized.md).

    python docs/quantized_plan_validation.py measure --model quick --lengths 1024,2048 --chunk-size 256 --output docs/bench/q4-quick.json
    python docs/quantized_plan_validation.py measure --model llama-56m --lengths 1024,2048 --chunk-size 512 --output docs/bench/q4-llama-56m.json
    python docs/quantized_plan_validation.py table docs/bench/q4-*.json

Each case runs in a fresh process with the bench's malloc settings and measuring loop
(`chunkwise.tools.bench.measure.measure_case`: one priming step, the peak resident set of one step above the
loaded model); the model is the bench's, saved and reloaded quantized by transformers (nf4, float32 compute),
with LoRA r=8 on q_proj/v_proj. The prediction is the planner's plan for it (`Training(quantization=...)`)
without optimizer state, less the weights (they are in the baseline); it includes the dequantization workspace.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

MARKER = "QUANTIZED-RESULT "


def build_quantized(case, device):
    """The bench model of `case`, saved and loaded back 4-bit, with LoRA r=case.lora_r on q/v."""
    import warnings

    import torch

    from chunkwise.models.loading import add_lora, load_causal_lm
    from chunkwise.models.quantize import Quantization
    from chunkwise.tools.bench.measure import build_model

    dense = build_model(case.model, dtype=torch.float32, device=torch.device("cpu"), lora_r=0, seed=case.seed)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense.save_pretrained(folder)
        del dense
        model = load_causal_lm(folder, quantization=Quantization(load_in_4bit=True), compute_dtype=torch.float32, device=device)
    torch.manual_seed(case.seed)
    return add_lora(model, rank=case.lora_r)


def run_child(case_json: str) -> None:
    from chunkwise.tools.bench.case import BenchCase
    from chunkwise.tools.bench.measure import measure_case

    result = measure_case(BenchCase(**json.loads(case_json)), build=build_quantized)
    print(MARKER + json.dumps({"case": asdict(result.case), "status": result.status, "peak": result.peak_memory_bytes,
                               "baseline": result.baseline_bytes, "error": result.error}))


def measure(args) -> None:
    from chunkwise.tools.bench.case import BenchCase
    from chunkwise.tools.bench.runner import child_environment

    results = []
    for length in map(int, args.lengths.split(",")):
        case = BenchCase(method="seco", seq_len=length, model=args.model, chunk_size=args.chunk_size, lora_r=8,
                         repeats=1, warmup=0, threads=1)
        proc = subprocess.run([sys.executable, __file__, "child", json.dumps(asdict(case))], capture_output=True, text=True,
                              env=child_environment())
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith(MARKER)), None)
        if line is None:
            raise SystemExit(f"case {length} failed: {proc.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(line[len(MARKER):]))
        print(results[-1])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))


def predicted(case: dict) -> int:
    from transformers import LlamaConfig

    from chunkwise.models.quantize import Quantization
    from chunkwise.models.presets import BENCH_MODELS
    from chunkwise.plan import ModelShape, Training, method_plan

    shape = ModelShape.from_config(LlamaConfig(**BENCH_MODELS[case["model"]]), name=case["model"])
    training = Training.from_precision("float32", device_type="cpu", lora_r=case["lora_r"], optimizer_states=0,
                                       quantization=Quantization(load_in_4bit=True))
    plan = method_plan(shape, training, "seco", seq_len=case["seq_len"], chunk_size=case["chunk_size"])
    return plan.total("cpu") - plan.parts.get("weights", 0) - plan.parts.get("weight_copies", 0)


def table(paths) -> None:
    from chunkwise.utils.memory import MiB

    print("| model | length | chunk | predicted (MiB) | measured (MiB) | error |\n|---|---:|---:|---:|---:|---:|")
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            case, guess = row["case"], predicted(row["case"])
            print(f"| {case['model']} (nf4, LoRA r={case['lora_r']}) | {case['seq_len']} | {case['chunk_size']} | "
                  f"{guess / MiB:.1f} | {row['peak'] / MiB:.1f} | {guess / row['peak'] - 1:+.1%} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        run_child(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--lengths", default="1024,2048")
    m.add_argument("--chunk-size", type=int, default=256)
    m.add_argument("--output", required=True)
    t = commands.add_parser("table")
    t.add_argument("paths", nargs="+")
    args = parser.parse_args()
    measure(args) if args.command == "measure" else table(args.paths)
