"""Chunk-wise DPO on a long-context preference task, against full-sequence DPO (docs/preference.md).

The task: the demo's key→value recall (`chunkwise.data.RecallTask`) as preference pairs. The prompt
states a key→value pair at its very start, then fills the rest of `--seq-len` tokens with filler, then
asks for the key; the chosen answer is the right value, the rejected one another value. Nothing near the
question tells them apart: only the start of the sequence does, thousands of tokens earlier.

First the demo model is trained briefly with ordinary next-token loss on the recall task at a short
length (`--sft-seq-len`, SeCO): the usual SFT-then-DPO recipe, and a starting point that half knows the
task but fails at `--seq-len`. Then the same `chunkwise train --objective dpo` run is made twice from
that model and the same seed — `--method seco` (chunks of `--chunk-size`) and `--method full` (one
ordinary forward and backward per micro-batch) — with a frozen copy of the starting model as the
reference. Afterwards both models and the starting one are scored on held-out pairs: the fraction whose
chosen answer gets the higher log-probability (chance: 50%) and the mean DPO reward margin.

    python docs/preference_experiment.py                  # the numbers in docs/preference.md
    python docs/preference_experiment.py --steps 10 --seq-len 512 --sft-steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from chunkwise.core.batch import chunk_batch
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.reference import ReferenceModel, reference_token_logps
from chunkwise.data.preferences import collate_pairs, read_preference_pairs
from chunkwise.data.synthetic import DEMO_TASK
from chunkwise.recipes.run import load_trained_model
from chunkwise.recipes.train import TrainConfig, train


def preference_rows(count: int, *, seq_len: int, seed: int) -> list[dict]:
    """`count` prompt/chosen/rejected examples of about `seq_len` tokens (word-level, the demo vocabulary)."""
    words = DEMO_TASK.vocabulary
    value_ids = range(len(DEMO_TASK.SPECIALS) + DEMO_TASK.num_keys, len(DEMO_TASK.SPECIALS) + DEMO_TASK.num_keys + DEMO_TASK.num_values)
    rows = []
    for position in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + position)
        sample = DEMO_TASK.sample(seq_len - 1, generator)  # the chosen answer and EOS complete it to seq_len
        *prompt, answer = sample.input_ids
        wrong = [v for v in value_ids if v != answer][int(torch.randint(DEMO_TASK.num_values - 1, (1,), generator=generator))]
        rows.append({"prompt": " ".join(words[t] for t in prompt), "chosen": " " + words[answer], "rejected": " " + words[wrong]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@torch.no_grad()
def preference_scores(model, reference, pairs, *, chunk_size: int, beta: float) -> dict:
    """Held-out accuracy (chosen answer more likely than rejected) and mean DPO reward margin."""
    handle = inspect_causal_lm(model)
    correct, margins = 0, []
    for start in range(0, len(pairs), 8):
        batch = collate_pairs(pairs[start : start + 8], pad_token_id=0)
        chunked = chunk_batch(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                              chunk_size=chunk_size, vocab_size=handle.vocab_size, hidden_size=handle.hidden_size,
                              device=torch.device("cpu"))
        policy = reference_token_logps(ReferenceModel(model), chunked, chunk_size=chunk_size).sum(1)
        ref = reference_token_logps(ReferenceModel(reference), chunked, chunk_size=chunk_size).sum(1)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        correct += int((chosen > rejected).sum())
        margins += (beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).tolist()
    return {"accuracy": correct / len(pairs), "margin": sum(margins) / len(margins)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=150, help="next-token training steps before DPO (0: none)")
    parser.add_argument("--sft-seq-len", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="seco,full", help="comma-separated; the comparison needs both")
    parser.add_argument("--output", default="runs/preference-experiment")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --output's results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    output = Path(args.output)
    if args.plot_only:
        plot(json.loads((output / "results.json").read_text()), output / "preference-loss.png")
        return
    output.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(output / "train.jsonl", preference_rows(args.steps * args.batch_size, seq_len=args.seq_len, seed=args.seed))
    held_out_file = write_jsonl(output / "held_out.jsonl", preference_rows(args.held_out, seq_len=args.seq_len, seed=args.seed + 1_000))

    methods = args.methods.split(",")
    results = {"settings": vars(args), "runs": {}}
    start_model = "demo-llama"
    if args.sft_steps:
        train(TrainConfig(output=str(output / "sft"), seq_len=args.sft_seq_len, chunk_size=min(args.chunk_size, args.sft_seq_len),
                          steps=args.sft_steps, seed=args.seed, dtype=args.dtype, device="cpu", eval_every=0, checkpoint_every=0,
                          progress=False, overwrite=True))
        start_model = str(output / "sft" / "model")
    for method in methods:
        config = TrainConfig(
            model=start_model, data=str(train_file), objective="dpo", beta=args.beta, method=method, lora_r=0,
            seq_len=args.seq_len, chunk_size=args.chunk_size, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
            warmup_ratio=0.05, adam_beta2=0.98, seed=args.seed, dtype=args.dtype, device="cpu", checkpoint_every=0,
            progress=False, output=str(output / method), overwrite=True,
        )
        started = time.perf_counter()
        train(config)
        records = [json.loads(line) for line in (output / method / "metrics.jsonl").read_text().splitlines()]
        results["runs"][method] = {"seconds": time.perf_counter() - started, "steps": [r for r in records if r["kind"] == "train"]}

    tokenizer = DEMO_TASK.tokenizer()
    held_out = read_preference_pairs(str(held_out_file), tokenizer, seq_len=args.seq_len)
    dtype = getattr(torch, args.dtype)
    start, _, _ = load_trained_model(start_model, dtype=dtype)  # the reference
    results["held_out"] = {"start": preference_scores(start, start, held_out, chunk_size=args.chunk_size, beta=args.beta)}
    for method in methods:
        model, _, _ = load_trained_model(str(output / method), dtype=dtype)
        results["held_out"][method] = preference_scores(model, start, held_out, chunk_size=args.chunk_size, beta=args.beta)

    if set(methods) >= {"seco", "full"}:
        seco, full = (results["runs"][m]["steps"] for m in ("seco", "full"))
        differences = [abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in zip(seco, full)]
        results["loss_difference"] = {"max": max(differences), "first_step_above_1e-3": next((i + 1 for i, d in enumerate(differences) if d > 1e-3), None)}
    (output / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, output / "preference-loss.png")
    steps = len(next(iter(results["runs"].values()))["steps"])
    summary = {
        "loss_difference": results.get("loss_difference"), "held_out": results["held_out"],
        "seconds": {m: round(results["runs"][m]["seconds"], 1) for m in methods},
        "loss": {m: [round(results["runs"][m]["steps"][i]["loss"], 4) for i in (0, steps // 4, steps // 2, 3 * steps // 4, -1)] for m in methods},
        "margin": {m: [round(results["runs"][m]["steps"][i]["rewards/margins"], 4) for i in (0, steps // 4, steps // 2, 3 * steps // 4, -1)] for m in methods},
    }
    print(json.dumps(summary, indent=1))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = {"seco", "full"} <= set(results["runs"])
    figure, axes = plt.subplots(1, 3 if both else 2, figsize=(15 if both else 10, 3.6))
    loss_axis, margin_axis = axes[:2]
    for method, style in (("full", dict(color="0.6", linewidth=4)), ("seco", dict(color="C0", linewidth=1.2))):
        if method not in results["runs"]:
            continue
        steps = results["runs"][method]["steps"]
        x = [r["step"] for r in steps]
        loss_axis.plot(x, [r["loss"] for r in steps], label=f"{method}", **style)
        margin_axis.plot(x, [r["rewards/margins"] for r in steps], label=f"{method}", **style)
    loss_axis.axhline(math.log(2), color="0.8", linestyle=":", linewidth=1)
    loss_axis.set(xlabel="step", ylabel="DPO loss", title="training loss (log 2 = no preference)")
    margin_axis.set(xlabel="step", ylabel="β · margin", title="reward margin (chosen − rejected)")
    for axis in (loss_axis, margin_axis):
        axis.legend()
    if both:
        seco, full = results["runs"]["seco"]["steps"], results["runs"]["full"]["steps"]
        axes[2].semilogy([r["step"] for r in seco], [max(abs(a["loss"] - b["loss"]) / abs(b["loss"]), 1e-17) for a, b in zip(seco, full)])
        axes[2].set(xlabel="step", ylabel="|seco − full| / full", title=f"loss difference ({results['settings']['dtype']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
