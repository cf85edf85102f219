"""`adaptive` against the fixed policies: exact statistics of each gradient estimate on one batch.

    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/diagnosis.json
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/step_times.json --step-times 20
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/stratification.json --stratification 100
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/results.json \
        --collect runs/spaco-quality/runs --ratio 0.718     # score the runs (commands in the file)

For one batch of 8 x 1,024 tokens (k = 8 chunks of 128, t = 2, float64, the demo's model at its initial
weights) of two tasks:

* `recall`: docs/spaco.md's task (the key→value pair in chunk 0, the one target in chunk 7);
* `random-depth`: the same sequences with the pair block moved to a uniformly random depth in the filler
  (the target still in chunk 7, the fact in any chunk);

every selection (`uniform`, `bernoulli`; on recall docs/spaco/diagnosis.json has them, same batch and
model) or every decision path (`adaptive`, walked depth-first as in
tests/core/test_adaptive.py: q depends on the relay, hence on earlier decisions) is run and weighted by its
probability: P(estimate = 0), relative bias ‖E ĝ − g‖/‖g‖, relative RMS error √E‖ĝ − g‖²/‖g‖, and the
expected number of chunks backpropagated. `adaptive-relay-blind` is `adaptive` with every relay norm read
as 1 where a relay arrived (target-aware only): what the relay-proportional q buys.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from spaco_bias import FixedSelection  # noqa: E402  (a sampler that always returns one selection)

from chunkwise import SeCO, SpaCO  # noqa: E402
from chunkwise.core.sampling import AdaptivePlan, AdaptiveSampler  # noqa: E402
from chunkwise.data.synthetic import DEMO_TASK  # noqa: E402
from chunkwise.models.presets import build_tiny_model  # noqa: E402

SEQ_LEN, CHUNK, BATCH, BUDGET = 1024, 128, 8, 2
BATCH_SEED = 12345 + 1  # docs/spaco_quality.py's diagnosis batch


def recall_batch() -> dict:
    return DEMO_TASK.batch(0, batch_size=BATCH, seq_len=SEQ_LEN, seed=BATCH_SEED)


def random_depth_batch(seed: int = 0) -> dict:
    """The recall batch with each row's pair block (after <bos>) moved to a random depth in its filler."""
    batch = {name: tensor.clone() for name, tensor in recall_batch().items()}
    generator = torch.Generator().manual_seed(seed)
    pairs = 2 * DEMO_TASK.num_pairs * DEMO_TASK.repeats
    queries = 3 * DEMO_TASK.num_pairs
    for row in batch["input_ids"]:
        block, filler = row[1 : 1 + pairs].clone(), row[1 + pairs : SEQ_LEN - queries].clone()
        depth = int(torch.randint(0, len(filler) + 1, (), generator=generator))
        row[1 : SEQ_LEN - queries] = torch.cat([filler[:depth], block, filler[depth:]])
    return batch


class ForcedPlan(AdaptivePlan):
    """Follows `forced` decisions, then drops; `relay_blind`: q sees 1 wherever a relay arrived."""

    forced: list[bool] = []
    relay_blind = False

    def probability(self, chunk, counts, relay):
        return super().probability(chunk, counts, (relay > 0).double() if self.relay_blind else relay)

    def _keep(self, chunk, q, draw):
        made = sum(1 for _, p, _ in self.trace if 0 < p < 1)
        return self.forced[made] if made < len(self.forced) else False


def statistics(outcomes, exact: torch.Tensor) -> dict:
    """From (probability, gradient, chunks) of every outcome: the estimate's exact statistics."""
    mean, square_error, zero, chunks, total = torch.zeros_like(exact), 0.0, 0.0, 0.0, 0.0
    for probability, estimate, count in outcomes:
        mean += probability * estimate
        square_error += probability * float((estimate - exact).norm() ** 2)
        zero += probability * float(estimate.norm() == 0)
        chunks += probability * count
        total += probability
    assert abs(total - 1) < 1e-9, total
    return {"zero_probability": zero, "relative_bias": float((mean - exact).norm() / exact.norm()),
            "relative_rms_error": math.sqrt(square_error) / float(exact.norm()), "expected_chunks": chunks,
            "outcomes": len(outcomes)}


def diagnose(model, batch: dict, policies: set[str]) -> dict:
    k = SEQ_LEN // CHUNK

    def gradient(engine) -> tuple[torch.Tensor, int]:
        model.zero_grad(set_to_none=True)
        out = engine.backward(batch["input_ids"], labels=batch["labels"])
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
        return torch.cat(grads), len(out.selected)

    def fixed(chunks):
        return gradient(SpaCO(model, chunk_size=CHUNK, sampling=FixedSelection(chunks, budget=BUDGET)))

    def adaptive_paths(relay_blind: bool):
        outcomes, stack = [], [[]]
        while stack:
            prefix = stack.pop()
            sampler = AdaptiveSampler(budget=BUDGET, seed=0)
            sampler.plan_class = type("Forced", (ForcedPlan,), {"forced": prefix, "relay_blind": relay_blind})
            estimate, count = gradient(SpaCO(model, chunk_size=CHUNK, sampling=sampler))
            points = [(q, kept) for _, q, kept in sampler.last_plan.trace if 0 < q < 1]
            stack.extend([kept for _, kept in points[:i]] + [True] for i in range(len(prefix), len(points)))
            outcomes.append((math.prod(q if kept else 1 - q for q, kept in points), estimate, count))
        return outcomes

    exact, _ = gradient(SeCO(model, chunk_size=CHUNK))
    pairs = list(itertools.combinations(range(k), BUDGET))
    q = BUDGET / k
    result = {}
    if "uniform" in policies:
        result["uniform"] = statistics([(1 / len(pairs), *fixed(s)) for s in pairs], exact)
    if "bernoulli" in policies:
        result["bernoulli"] = statistics([(q ** n * (1 - q) ** (k - n), *fixed(s)) for n in range(k + 1)
                                          for s in itertools.combinations(range(k), n)], exact)
    for name, blind in (("adaptive", False), ("adaptive-relay-blind", True)):
        if name not in policies:
            continue
        started = time.perf_counter()
        result[name] = statistics(adaptive_paths(blind), exact)
        print(name, f"{time.perf_counter() - started:.0f} s", flush=True)
    return result


def step_times(rounds: int, warmup: int = 2) -> dict:
    """Mean seconds per optimizer step of seco, uniform, bernoulli and adaptive (t = 2), interleaved round-robin
    on the same batches, one thread, the demo's model in float32: on the recall batches and on the same
    sequences with every token a target (dense). Also the seconds `adaptive` spends in its decisions."""
    from spaco_quality import timed_decisions

    model = build_tiny_model("demo-llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engines = {"seco": SeCO(model, chunk_size=CHUNK),
               "uniform": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, seed=0),
               "bernoulli": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="bernoulli", seed=0),
               "adaptive": SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", seed=0)}
    results = {}
    with timed_decisions() as deciding:
        for task in ("recall", "dense"):
            times, chunks = {name: [] for name in engines}, {name: [] for name in engines}
            for round_ in range(warmup + rounds):
                if round_ == warmup:
                    deciding[0] = 0.0
                for name, engine in engines.items():
                    started = time.perf_counter()
                    batch = DEMO_TASK.batch(round_, batch_size=BATCH, seq_len=SEQ_LEN, seed=0)
                    labels = batch["input_ids"] if task == "dense" else batch["labels"]
                    out = engine.backward(batch["input_ids"], labels=labels)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if round_ >= warmup:
                        times[name].append(time.perf_counter() - started)
                        chunks[name].append(len(out.selected))
            results[task] = {name: {"seconds": sum(v) / len(v), "chunks_backpropagated": sum(chunks[name]) / len(v)}
                             for name, v in times.items()}
            results[task]["adaptive"]["decision_seconds"] = deciding[0] / rounds
            print(task, json.dumps(results[task]), flush=True)
    return results


def collect(work: Path, output: Path, step_ratio: float) -> dict:
    """The `adaptive` recall runs in `work` (equal steps: 400; equal time: 400 / `step_ratio` steps), read as
    docs/spaco_quality.py reads its runs, each final model scored on its 256 held-out sequences."""
    from spaco_quality import METHODS, DEMO_OPTIONS, EVAL_EVERY, final_accuracy, read_run

    runs = []
    for budget, steps in (("steps", 400), ("time", round(400 / step_ratio))):
        for seed in (0, 1, 2):
            run = work / f"recall-adaptive-{budget}-seed{seed}"
            if not (run / "metrics.jsonl").exists():
                continue
            command = ["chunkwise", "train", *METHODS["adaptive"], *DEMO_OPTIONS, "--steps", str(steps), "--seed", str(seed),
                       "--eval-every", str(EVAL_EVERY), "--checkpoint-every", "0", "--no-progress", "--output", str(run)]
            record = {"name": run.name, "task": "recall", "budget": budget, "method": "adaptive", "seed": seed,
                      "steps": steps, "command": " ".join(command), **read_run(run), "final": final_accuracy(run)}
            print(run.name, record["final"], "zero-gradient steps", record["zero_gradient_steps"], flush=True)
            runs.append(record)
    results = {"step_time_ratio": {"adaptive": step_ratio}, "runs": runs}
    output.write_text(json.dumps(results, indent=1))
    return results


def stratification(windows: int, steps: int, tasks=("last", "everywhere")) -> dict:
    """Relative RMS error of the mean of `steps` consecutive gradient estimates (the same batch each step),
    over `windows` seeds, stratified draws against fresh ones: tests/core/test_adaptive.py's float64 tiny Llama
    (k = 5 chunks of 4 tokens, t = 2), targets on the last token only and on every token."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from spaco_reference import CHUNK as TINY_CHUNK, batch as tiny_batch, float64_model, seco_grads

    model = float64_model("tiny-llama")
    results = {}
    for where in tasks:
        input_ids, labels = tiny_batch(where)
        exact = torch.cat([g.flatten() for g in seco_grads(model, input_ids, labels).values()])
        for stratify in (True, False):
            errors = []
            for seed in range(windows):
                engine = SpaCO(model, chunk_size=TINY_CHUNK, sampling=AdaptiveSampler(budget=BUDGET, seed=seed, stratify=stratify))
                total = torch.zeros_like(exact)
                for _ in range(steps):
                    model.zero_grad(set_to_none=True)
                    engine.backward(input_ids, labels=labels)
                    total += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                        for p in model.parameters() if p.requires_grad])
                errors.append(float((total / steps - exact).norm() ** 2))
            key = f"{where}, {'stratified' if stratify else 'fresh draws'}"
            results[key] = math.sqrt(sum(errors) / windows) / float(exact.norm())
            print(key, f"relative RMS error of a {steps}-step mean: {results[key]:.4f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/spaco/adaptive/diagnosis.json")
    parser.add_argument("--step-times", type=int, metavar="ROUNDS", help="instead: interleaved step times, ROUNDS rounds")
    parser.add_argument("--policies", default="uniform,bernoulli,adaptive,adaptive-relay-blind",
                        help="which to enumerate (on recall, uniform and bernoulli are docs/spaco/diagnosis.json's)")
    parser.add_argument("--collect", metavar="WORK", help="instead: score the adaptive recall runs in WORK")
    parser.add_argument("--ratio", type=float, help="with --collect: adaptive's step time / SeCO's (the equal-time steps)")
    parser.add_argument("--stratification", type=int, metavar="WINDOWS", help="instead: stratified vs fresh draws")
    parser.add_argument("--stratification-tasks", default="last,everywhere")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stratification:
        tasks = args.stratification_tasks.split(",")
        Path(args.output).write_text(json.dumps(stratification(args.stratification, steps=4, tasks=tasks), indent=1))
        return
    if args.collect:
        collect(Path(args.collect), Path(args.output), args.ratio)
        return
    if args.step_times:
        Path(args.output).write_text(json.dumps(step_times(args.step_times), indent=1))
        return
    model = build_tiny_model("demo-llama").double()
    results = {}
    for task, batch in (("recall", recall_batch()), ("random-depth", random_depth_batch())):
        policies = set(args.policies.split(",")) - (set() if task == "random-depth" else {"uniform", "bernoulli"})
        results[task] = diagnose(model, batch, policies)
        print(task, json.dumps(results[task], indent=1), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
