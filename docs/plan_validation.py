"""Compare `chunkwise plan`'s predicted peaks with the peaks `chunkwise bench` measured (docs/plan.md).

    python docs/plan_validation.py models /tmp/plan-models         # write the two local models the runs use
    chunkwise bench ... --output docs/bench/plan-<case>            # the commands in docs/plan.md
    python docs/plan_validation.py table docs/bench/plan-*         # predicted vs measured, as Markdown
    MALLOC_MMAP_THRESHOLD_=16384 MALLOC_TRIM_THRESHOLD_=0 python docs/plan_validation.py workspace quick 128

The bench measures a step's peak above the loaded model (no optimizer: it only runs backward), so the
prediction compared is the plan without optimizer state, less the weights; on a CPU an offloaded KV
cache lives in the same memory, so it is added back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chunkwise.plan import MiB, ModelShape, Training, method_plan

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
    from transformers import LlamaConfig

    from chunkwise.bench import BENCH_MODELS

    if model in BENCH_MODELS:
        return ModelShape.from_config(LlamaConfig(**BENCH_MODELS[model]), name=model)
    if Path(model).name in LOCAL_MODELS:
        return ModelShape.from_config(local_config(Path(model).name), name=Path(model).name)
    return ModelShape.from_name(model)


def spaco_selection(case: dict, num_chunks: int) -> str:
    """The chunks SpaCO backpropagated in the measured step: the first draw of a sampler seeded as the bench's
    engine is (the bench measures one step after no warmup)."""
    if case["method"] != "spaco" or case["warmup"] != 0 or case["repeats"] != 1:
        return ""
    from chunkwise.sampling import make_sampler

    chunks = make_sampler("uniform", budget=case["budget"], max_compensation=None, seed=case["seed"]).select(num_chunks).chunks
    return f"chunks {', '.join(map(str, chunks))} of {num_chunks}"


def rows(report: dict) -> list[dict]:
    """Predicted vs measured for every case of one bench.json."""
    settings = report["settings"]
    if settings["device"] != "cpu" or settings["dtype"] != "float32":
        raise SystemExit(f"only CPU float32 runs are compared here, got {settings['device']} {settings['dtype']}")
    shape = shape_of(settings["model"])
    training = Training.from_precision("float32", device_type="cpu", lora_r=settings["lora_r"], batch_size=settings["batch_size"],
                                       attention=settings["attention"], optimizer_states=0)
    out = []
    for result in report["results"]:
        case = result["case"]
        if result["status"] != "ok" or case["method"] not in ("full", "ckpt", "seco", "spaco"):
            continue
        method = "seco+offload" if case["method"] == "seco" and case["offload_kv"] else case["method"]
        plan = method_plan(shape, training, method, seq_len=case["seq_len"], chunk_size=case["chunk_size"])
        predicted = plan.total("cpu") - plan.parts.get("weights", 0)
        measured = result["peak_memory_bytes"]
        variant = ", ".join(filter(None, [f"LoRA r={settings['lora_r']}" if settings["lora_r"] else "",
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


def lm_head_workspace(model: str, tokens: int) -> str:
    """Resident memory the LM head's matmul takes beyond its output, measured as the bench measures.

    Run in a fresh process with `chunkwise.bench.child_environment()`'s malloc settings: the part above
    the output is BLAS's packing buffer, which the planner does not count.
    """
    import torch

    from chunkwise.bench import CpuMemory

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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models").add_argument("folder", type=Path)
    commands.add_parser("table").add_argument("runs", type=Path, nargs="+")
    workspace = commands.add_parser("workspace")
    workspace.add_argument("model")
    workspace.add_argument("tokens", type=int)
    args = parser.parse_args(argv)
    if args.command == "models":
        make_models(args.folder)
    elif args.command == "workspace":
        print(lm_head_workspace(args.model, args.tokens))
    else:
        print(table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
