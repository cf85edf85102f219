"""Does SpaCO train as well as SeCO? Held-out curves at equal steps and at equal wall time, several seeds.

    # docs/spaco.md's runs (27 runs, 4.8 h of one-thread run time; about 2.5 h with --workers 2):
    .venv/bin/python docs/spaco_quality.py --output docs/spaco --tasks recall
    # the dense variant (12 runs, 1.2 h) and the learning-rate check (3 runs each, about 25 min each):
    .venv/bin/python docs/spaco_quality.py --output docs/spaco/dense --tasks dense --steps 200 \
        --methods seco,uniform,uniform-cap2,bernoulli --step-times docs/spaco/results.json
    .venv/bin/python docs/spaco_quality.py --output docs/spaco/lr-2e-2 --tasks recall --methods uniform-cap2 \
        --steps-only --lr 2e-2 --step-times docs/spaco/results.json                           # and --lr 5e-3
    .venv/bin/python docs/spaco_quality.py --output /tmp/q --seeds 0 --steps 40 --tasks recall   # a smoke run

Every training run is a `chunkwise train` command (printed, and stored in results.json), run in its own
process with one thread; `--workers` of them at a time. Methods (chunk 128 of 1024 tokens: k = 8 chunks):

    full          ordinary backprop                    (--method full)
    seco          exact chunk-wise gradient            (--method seco)
    uniform       SpaCO, the paper's policy, t = 2     (--method spaco --budget 2)                    factor 4
    uniform-cap2  the same, factor capped at 2.0       (... --max-compensation 2.0), as the paper trains
    bernoulli     SpaCO, unbiased, t = 2 on average    (--method spaco --budget 2 --sampling bernoulli)
    adaptive      SpaCO, decided in stage 2, unbiased,  (--method spaco --budget 2 --sampling adaptive)
                  at most t = 2 on average
    adaptive-t3   the same with t = 3                  (--method spaco --budget 3 --sampling adaptive)

Tasks:

* `recall`: the demo's task (`data.RecallTask`, docs/demo.md) at 1024 tokens: a key→value pair in the
  first 9 tokens, one labelled answer at the very end. Only the last chunk has a target, and the
  answer can be learnt only through the KV gradient relayed to chunk 0. Held-out accuracy every 25 steps
  (32 sequences, `chunkwise train`'s own evaluation) and at the end on 256 held-out sequences.
* `random-depth`: the recall task with each sequence's pair block at a uniformly random depth in its filler
  (`chunkwise train --pair-depth random`): the answer still in the last chunk, the fact in any chunk, so the
  relay that teaches it ends in a different chunk from sequence to sequence. Scored like `recall`, on 256
  held-out sequences of the same layout.
* `dense`: the same sequences with every token a target (language-model style, as the paper trains):
  written to JSONL and trained with `--data`/`--eval-data`, so the held-out curve is the LM loss the
  paper reports; the recall accuracy of the final models is scored afterwards on the 256 sequences.

Equal steps: every method runs `--steps`. Equal wall time: the machine is shared with other jobs, so
wall time is not measured per run but derived from step-time *ratios* measured in one process with the
methods' steps interleaved (round-robin, `TIMING_ROUNDS` rounds, same batches, one thread). Each method
then gets `round(steps * t_seco / t_method)` steps: what it does in SeCO's time. Each run's own logged
step times are reported beside the ratios as a check.

A diagnosis (`gradient_diagnosis`): on one `recall` batch, at the initial model and at SeCO's final model
(first seed), each policy's gradient estimate against the exact gradient, exactly (every selection
enumerated): how likely it is zero, its bias, its RMS error, and how much of the exact gradient comes
through the KV relay at all (kept in diagnosis.json; exact over every selection, one batch of 8 x 1024
tokens, k = 8, float64).

Outputs: results.json (everything) and curves.png in `--output`; run directories and logs in `--work`.
Interrupted, it picks up where it stopped (runs already in results.json are kept).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SEQ_LEN, CHUNK, BATCH, BUDGET, CAP = 1024, 128, 8, 2, 2.0
DEMO_OPTIONS = ["--lr", "1e-2", "--adam-beta2", "0.98", "--warmup-ratio", "0.05", "--batch-size", str(BATCH),
                "--seq-len", str(SEQ_LEN), "--chunk-size", str(CHUNK)]
METHODS = {
    "full": ["--method", "full"],
    "seco": ["--method", "seco"],
    "uniform": ["--method", "spaco", "--budget", str(BUDGET)],
    "uniform-cap2": ["--method", "spaco", "--budget", str(BUDGET), "--max-compensation", str(CAP)],
    "bernoulli": ["--method", "spaco", "--budget", str(BUDGET), "--sampling", "bernoulli"],
    "adaptive": ["--method", "spaco", "--budget", str(BUDGET), "--sampling", "adaptive"],
    "adaptive-t3": ["--method", "spaco", "--budget", str(BUDGET + 1), "--sampling", "adaptive"],
}
EVAL_EVERY = 25
FINAL_SEQUENCES, FINAL_SEED = 256, 12345  # the final held-out set: a stream no training run reads
TIMING_ROUNDS, TIMING_WARMUP = int(os.environ.get("SPACO_TIMING_ROUNDS", 40)), 3
TASKS = ("recall", "random-depth", "dense")
RECALL_TASKS = {"recall": "start", "random-depth": "random"}  # the tasks scored by recall accuracy: their --pair-depth


# ----- step-time ratios, interleaved ------------------------------------------------------------------


@contextlib.contextmanager
def timed_decisions():
    """Count the seconds spent inside `AdaptivePlan.decide` (its relay norms included) while the block runs: yields
    a one-item list holding the running total (reset it to 0.0 after warm-up)."""
    from chunkwise.core.sampling import AdaptivePlan

    decide, deciding = AdaptivePlan.decide, [0.0]

    def timed_decide(plan, chunk, state):
        started = time.perf_counter()
        try:
            return decide(plan, chunk, state)
        finally:
            deciding[0] += time.perf_counter() - started

    AdaptivePlan.decide = timed_decide
    try:
        yield deciding
    finally:
        AdaptivePlan.decide = decide


def measure_step_times(methods=tuple(METHODS), task: str = "recall") -> dict[str, float]:
    """Mean seconds of one optimizer step per method (batch made, backward, AdamW) on `task`'s batches (recall or
    random-depth), interleaved round-robin; under "adaptive-decisions", the seconds per step `adaptive` spends
    deciding (inside its steps)."""
    from chunkwise import SeCO, SpaCO
    from chunkwise.data.synthetic import synthetic_task_for
    from chunkwise.models.presets import build_tiny_model
    from chunkwise.recipes.train.step import full_backward

    torch.set_num_threads(1)
    model = build_tiny_model("demo-llama")
    data = synthetic_task_for(model.config.vocab_size, RECALL_TASKS[task])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engines = {
        "full": None,
        "seco": SeCO(model, chunk_size=CHUNK),
        "uniform": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, seed=0),
        "uniform-cap2": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, max_compensation=CAP, seed=0),
        "bernoulli": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="bernoulli", seed=0),
        "adaptive": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", seed=0),
        "adaptive-t3": SpaCO(model, chunk_size=CHUNK, budget=BUDGET + 1, sampling="adaptive", seed=0),
    }
    engines = {name: engine for name, engine in engines.items() if name in methods}
    times = {name: [] for name in engines}
    with timed_decisions() as deciding:
        for round_ in range(TIMING_WARMUP + TIMING_ROUNDS):
            for name, engine in engines.items():
                started = time.perf_counter()
                batch = data.batch(round_, batch_size=BATCH, seq_len=SEQ_LEN, seed=0)
                targets = float((batch["labels"][:, 1:] != -100).sum())
                if engine is None:
                    full_backward(model, batch, targets)
                else:
                    engine.backward(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"], num_items=targets)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if round_ >= TIMING_WARMUP:
                    times[name].append(time.perf_counter() - started)
            if round_ == TIMING_WARMUP - 1:
                deciding[0] = 0.0
    means = {name: statistics.fmean(values) for name, values in times.items()}
    if "adaptive" in engines:
        means["adaptive-decisions"] = deciding[0] / TIMING_ROUNDS
    return means


# ----- the runs ---------------------------------------------------------------------------------------


def dense_data(folder: Path, steps: int) -> tuple[Path, Path]:
    """The recall sequences as text (every token a target when read as --data): training and held-out JSONL."""
    from chunkwise.data.synthetic import DEMO_TASK, held_out_seed

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = DEMO_TASK.vocabulary

    def write(path: Path, seed: int, count: int) -> Path:
        if not path.exists():
            lines = [json.dumps({"text": " ".join(vocabulary[i] for i in DEMO_TASK.sequence(p, seq_len=SEQ_LEN, seed=seed).input_ids)})
                     for p in range(count)]
            path.write_text("\n".join(lines) + "\n")
        return path

    return write(folder / "train.jsonl", 0, steps * BATCH), write(folder / "held_out.jsonl", held_out_seed(0), 32)


def run_command(task: str, method: str, seed: int, steps: int, output: Path, data: tuple[Path, Path] | None,
                lr: str | None = None) -> list[str]:
    options = DEMO_OPTIONS if lr is None else [lr if previous == "--lr" else value for previous, value in zip(["", *DEMO_OPTIONS], DEMO_OPTIONS)]
    command = ["chunkwise", "train", *METHODS[method], *options, "--steps", str(steps), "--seed", str(seed),
               "--eval-every", str(EVAL_EVERY), "--checkpoint-every", "0", "--no-progress", "--output", str(output), "--overwrite"]
    if task == "random-depth":
        command += ["--pair-depth", "random"]
    if task == "dense":
        train_file, held_out = data
        command += ["--model", "demo-llama", "--lora-r", "0", "--data", str(train_file), "--eval-data", str(held_out),
                    "--packing", "truncate"]
    return command


def run_one(command: list[str], log_path: Path) -> float:
    started = time.perf_counter()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    executable = [str(Path(sys.executable).parent / "chunkwise"), *command[1:]]
    with open(log_path, "w") as log:
        subprocess.run(executable, stdout=log, stderr=subprocess.STDOUT, env=environment, check=True)
    return time.perf_counter() - started


@torch.no_grad()
def final_accuracy(run: Path, task: str = "recall") -> dict:
    """Answer accuracy and loss of the run's final model on `FINAL_SEQUENCES` held-out sequences of `task` (recall
    or random-depth; the dense runs are scored on recall)."""
    from transformers.utils import logging as hf_logging

    from chunkwise.core.handle import inspect_causal_lm
    from chunkwise.core.inference import score_batches
    from chunkwise.data.synthetic import held_out_batches, synthetic_task_for
    from chunkwise.recipes.run import load_trained_model

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # a thread team waits on the slowest thread: on a busy machine one thread is faster
    model, _, _ = load_trained_model(str(run))
    data = synthetic_task_for(model.config.vocab_size, RECALL_TASKS.get(task, "start"))
    batches = held_out_batches(data, num_sequences=FINAL_SEQUENCES, batch_size=BATCH, seq_len=SEQ_LEN, seed=FINAL_SEED)
    scores, _ = score_batches(inspect_causal_lm(model.eval()), batches, chunk_size=CHUNK, device=torch.device("cpu"))
    return {"accuracy": scores.accuracy, "loss": scores.loss}


def read_run(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {
        "evaluations": [{k: r[k] for k in ("step", "loss", "accuracy", "seconds")} for r in records if r["kind"] == "eval"],
        "train_loss": [r["loss"] for r in train],
        "mean_step_seconds": statistics.fmean(r["seconds"] for r in train),
        "zero_gradient_steps": sum(1 for r in train if r["grad_norm"] == 0.0),
    }


# ----- diagnosis: the SpaCO gradient against the exact one ---------------------------------------------


def gradient_diagnosis(model_path: str | None) -> dict:
    """Exact statistics of each policy's gradient estimate on one recall batch, by enumerating every
    selection (as docs/spaco_bias.py does): P(the estimate is zero), relative bias ‖E ĝ − g‖/‖g‖, relative
    RMS error √E‖ĝ − g‖² / ‖g‖; and the share of the exact gradient that arrives through the KV relay
    (‖g − g_last‖/‖g‖, g_last: the last chunk backpropagated alone, factor 1). Float64."""
    import itertools

    from spaco_bias import FixedSelection  # docs/spaco_bias.py: a sampler that always returns one selection

    from chunkwise import SeCO, SpaCO
    from chunkwise.data.synthetic import DEMO_TASK
    from chunkwise.models.presets import build_tiny_model
    from chunkwise.recipes.run import load_trained_model

    torch.set_num_threads(1)
    model = (build_tiny_model("demo-llama") if model_path is None else load_trained_model(model_path)[0]).double()
    batch = DEMO_TASK.batch(0, batch_size=BATCH, seq_len=SEQ_LEN, seed=FINAL_SEED + 1)
    k = SEQ_LEN // CHUNK

    def gradient(engine) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        engine.backward(batch["input_ids"], labels=batch["labels"])
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])

    def selected(chunks, budget=BUDGET, cap=None) -> torch.Tensor:
        return gradient(SpaCO(model, chunk_size=CHUNK, sampling=FixedSelection(chunks, budget=budget, max_compensation=cap)))

    exact = gradient(SeCO(model, chunk_size=CHUNK))
    last_alone = selected((k - 1,), budget=k - 1, cap=1.0)
    pairs = list(itertools.combinations(range(k), BUDGET))
    q = BUDGET / k
    policies = {
        "uniform": [(1 / len(pairs), s, None) for s in pairs],
        "uniform-cap2": [(1 / len(pairs), s, CAP) for s in pairs],
        "bernoulli": [(q ** n * (1 - q) ** (k - n), s, None) for n in range(k + 1) for s in itertools.combinations(range(k), n)],
    }
    result = {"relay_share": float((exact - last_alone).norm() / exact.norm())}
    for name, selections in policies.items():
        mean, square_error, zero = torch.zeros_like(exact), 0.0, 0.0
        for probability, chunks, cap in selections:
            estimate = selected(chunks, cap=cap)
            mean += probability * estimate
            square_error += probability * float((estimate - exact).norm() ** 2)
            zero += probability * float(estimate.norm() == 0)
        result[name] = {
            "zero_probability": zero,
            "relative_bias": float((mean - exact).norm() / exact.norm()),
            "relative_rms_error": math.sqrt(square_error) / float(exact.norm()),
            "cosine_mean_exact": float(torch.nn.functional.cosine_similarity(mean, exact, dim=0)),
        }
    return result


def diagnose(path: Path, work: Path, seed: int) -> dict:
    """`gradient_diagnosis` at the initial model and at SeCO's final model of `seed`, kept in `path`."""
    if not path.exists():
        seco_final = work / "runs" / f"recall-seco-steps-seed{seed}"
        diagnosis = {"initial model": gradient_diagnosis(None), f"SeCO's final model (seed {seed})": gradient_diagnosis(str(seco_final))}
        path.write_text(json.dumps(diagnosis, indent=1))
    return json.loads(path.read_text())


# ----- plot ---------------------------------------------------------------------------------------------


def runs_for(results: dict, task: str, budget: str, method: str) -> list[dict]:
    """The runs of one curve; SeCO's equal-time runs are its equal-step runs (the time reference)."""
    budget = "steps" if method == "seco" else budget
    return [r for r in results["runs"] if (r["task"], r["budget"], r["method"]) == (task, budget, method)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, budget) for task in TASKS for budget in ("steps", "time") if any(
        r["task"] == task and r["budget"] == budget for r in results["runs"])]
    figure, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    ratios = results["step_time_ratio"]
    for row, (task, budget) in enumerate(panels):
        for column, metric in enumerate(("accuracy", "loss")):
            axis = axes[row][column]
            for colour, method in zip(("black", "tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple", "tab:brown"), METHODS):
                runs = runs_for(results, task, budget, method)
                if not runs:
                    continue
                steps = [e["step"] for e in runs[0]["evaluations"]]
                values = torch.tensor([[e[metric] for e in r["evaluations"]] for r in runs], dtype=torch.float64)
                x = [s * (ratios[method] if budget == "time" else 1.0) for s in steps]
                mean, low, high = values.mean(0), values.min(0).values, values.max(0).values
                axis.plot(x, mean, color=colour, label=f"{method} (mean of {len(runs)})")
                axis.fill_between(x, low, high, color=colour, alpha=0.12)
            axis.set_title(f"{task}, equal {'steps' if budget == 'steps' else 'wall time'}: held-out {metric}")
            axis.set_xlabel("optimizer step" if budget == "steps" else "time in SeCO steps (step-time ratio × step)")
            axis.grid(alpha=0.3)
            if metric == "accuracy" and task == "dense":
                axis.set_title(f"{task}, equal {budget}: held-out next-token accuracy (all tokens)")
        axes[row][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----- summary tables -------------------------------------------------------------------------------------


def summary_markdown(results: dict) -> str:
    """Markdown tables: final scores per method, budget and seed; step times; the gradient diagnosis."""
    lines = []
    for task in TASKS:
        for budget in ("steps", "time"):
            rows = [(m, runs_for(results, task, budget, m)) for m in METHODS]
            rows = [(m, runs) for m, runs in rows if runs and any(r["budget"] == budget for r in results["runs"] if r["task"] == task)]
            if not rows:
                continue
            lines += [f"\n**{task}, equal {'steps' if budget == 'steps' else 'wall time'}** (final model, {FINAL_SEQUENCES} held-out "
                      f"{'recall' if task == 'dense' else task} sequences; last in-training held-out loss; steps with a zero gradient)\n",
                      "| method | steps | accuracy per seed | mean accuracy | held-out loss per seed | zero-gradient steps |",
                      "|---|---:|---|---:|---|---:|"]
            for method, runs in rows:
                accuracies = [r["final"]["accuracy"] for r in runs]
                per_seed = " / ".join(f"{a:.1%}" for a in accuracies)
                losses = " / ".join(f"{r['evaluations'][-1]['loss']:.3f}" for r in runs)
                zeros = " / ".join(str(r["zero_gradient_steps"]) for r in runs)
                lines.append(f"| {method} | {runs[0]['steps']} | {per_seed} | {statistics.fmean(accuracies):.1%} | {losses} | {zeros} |")
    lines += ["\n**Step time** (interleaved measurement; and each run's own mean step time, median over its seeds)\n",
              "| method | interleaved s/step | ratio to SeCO | runs' own s/step (equal-step runs) |", "|---|---:|---:|---:|"]
    for method in [m for m in METHODS if m in results["step_seconds"]]:
        own = [r["mean_step_seconds"] for r in results["runs"] if r["method"] == method and r["budget"] == "steps"]
        lines.append(f"| {method} | {results['step_seconds'][method]:.3f} | {results['step_time_ratio'][method]:.3f} | "
                     f"{statistics.median(own):.3f} |" if own else f"| {method} | {results['step_seconds'][method]:.3f} | "
                     f"{results['step_time_ratio'][method]:.3f} | |")
    for model, diagnosis in results.get("diagnosis", {}).items():
        lines += [f"\n**Gradient estimate at the {model}** (relay share {diagnosis['relay_share']:.2f})\n",
                  "| policy | P(estimate = 0) | relative bias | relative RMS error | cosine(E ĝ, g) |", "|---|---:|---:|---:|---:|"]
        for policy in [p for p in diagnosis if p != "relay_share"]:
            d = diagnosis[policy]
            lines.append(f"| {policy} | {d['zero_probability']:.3f} | {d['relative_bias']:.3f} | {d['relative_rms_error']:.2f} | "
                         f"{d['cosine_mean_exact']:.4f} |")
    return "\n".join(lines) + "\n"


# ----- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/spaco", help="results.json and curves.png")
    parser.add_argument("--work", default="runs/spaco-quality", help="run directories, logs and the dense task's data")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tasks", default="recall,dense", help=f"some of {','.join(TASKS)}")
    parser.add_argument("--dense-time", action="store_true", help="also run the dense task at equal wall time")
    parser.add_argument("--steps-only", action="store_true", help="equal steps only (no equal-time runs)")
    parser.add_argument("--diagnosis-only", action="store_true", help="only the gradient diagnosis (needs SeCO's first-seed run)")
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the gradient diagnosis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    parser.add_argument("--timing-methods", default=",".join(METHODS), help="the methods whose steps are timed (interleaved)")
    parser.add_argument("--step-times", help="take the interleaved step times from this results.json instead of measuring them")
    parser.add_argument("--lr", default=None, help="another peak learning rate than the demo's 1e-2 (run names get -lr<value>)")
    args = parser.parse_args()
    output, work = Path(args.output), Path(args.work)
    output.mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    if args.diagnosis_only:
        print(json.dumps(diagnose(output / "diagnosis.json", work, seeds[0]), indent=1))
        return

    if "step_seconds" not in results and args.step_times:
        measured = json.loads(Path(args.step_times).read_text())
        results.update(step_seconds=measured["step_seconds"], timing=f"{measured['timing']} (from {args.step_times})")
    if "step_seconds" not in results:
        print("measuring step times (interleaved)...", flush=True)
        timed = next((task for task in tasks if task in RECALL_TASKS), "recall")
        results["step_seconds"] = measure_step_times(args.timing_methods.split(","), timed)
        results["timing"] = f"mean of {TIMING_ROUNDS} interleaved rounds after {TIMING_WARMUP} warm-up rounds, one thread, {timed} batches"
    results["step_time_ratio"] = {m: t / results["step_seconds"]["seco"] for m, t in results["step_seconds"].items() if m in METHODS}
    print("step time / SeCO's:", {m: round(r, 3) for m, r in results["step_time_ratio"].items()}, flush=True)

    plan = []
    dense = dense_data(work / "dense-data", args.steps) if "dense" in tasks else None
    for task in tasks:
        budgets = ["steps", "time"] if (task in RECALL_TASKS or args.dense_time) and not args.steps_only else ["steps"]
        for budget in budgets:
            for seed in seeds:
                for method in args.methods.split(","):
                    if budget == "time" and method == "seco":
                        continue  # SeCO's equal-time run is its equal-step run
                    steps = args.steps if budget == "steps" else round(args.steps / results["step_time_ratio"][method])
                    name = f"{task}-{method}-{budget}-seed{seed}" + (f"-lr{args.lr}" if args.lr else "")
                    plan.append((name, task, budget, method, seed, steps))
    done = {r["name"]: r for r in results.get("runs", [])}
    todo = [p for p in plan if p[0] not in done]
    print(f"{len(plan)} runs planned, {len(todo)} to do", flush=True)

    def execute(item):
        name, task, budget, method, seed, steps = item
        run = work / "runs" / name
        command = run_command(task, method, seed, steps, run, dense, args.lr)
        wall = run_one(command, work / "runs" / f"{name}.log")
        record = {"name": name, "task": task, "budget": budget, "method": method, "seed": seed, "steps": steps,
                  "command": " ".join(command), "wall_seconds": wall, **read_run(run)}
        print(f"{name}: {steps} steps in {wall:.0f} s; last held-out accuracy {record['evaluations'][-1]['accuracy']:.1%}", flush=True)
        return record

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        for record in pool.map(execute, todo):
            done[record["name"]] = record
            results["runs"] = [done[p[0]] for p in plan if p[0] in done]
            results_path.write_text(json.dumps(results, indent=1))
    results["runs"] = [done[p[0]] for p in plan]
    # Scored here, one after another: loading models in several threads at once can leave a tied LM head
    # untied and random (transformers' loading is not thread-safe).
    for record in results["runs"]:
        record["final"] = final_accuracy(work / "runs" / record["name"], record["task"])

    if "recall" in tasks and not results.get("diagnosis") and not args.no_diagnosis:
        results["diagnosis"] = diagnose(output / "diagnosis.json", work, seeds[0])
    results_path.write_text(json.dumps(results, indent=1))
    plot(results, output / "curves.png")
    (output / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results))
    print(f"wrote {results_path}, {output / 'summary.md'} and {output / 'curves.png'}", flush=True)


if __name__ == "__main__":
    main()
