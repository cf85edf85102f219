"""`adaptive` against the fixed policies: exact statistics of each gradient estimate on one batch.

    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/diagnosis.json
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/step_times.json --step-times 20
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/stratification.json --stratification 100
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/results.json \
        --collect runs/spaco-quality/runs --ratio 0.718     # score the runs (commands in the file)
    .venv/bin/python docs/spaco_adaptive.py --output docs/spaco/adaptive/dense_diagnosis.json --dense \
        [--tasks dense,recall] [--models initial,trained]    # the dense diagnosis and its candidate variants

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

`--dense`: the same statistics on the recall batch read as language-model data (`dense`: labels = input_ids,
every token a target) and on recall, at the initial model and at a trained dense `adaptive` run's final model,
for uniform, bernoulli, adaptive and candidate variants of it (`VARIANTS`: other floors, a relay split mixed
with an even one, a discounted carried share, a budget that counts the chunks actually kept). With every token a target no q reaches 1 and
adaptive walks up to 2^8 decision paths, each a full float64 step; the seconds of each enumeration are saved.
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


class VariantPlan(AdaptivePlan):
    """`adaptive`'s rule with two knobs (the dense diagnosis' candidates; with the defaults it is AdaptivePlan's rule):

    * `relay_weight` w: the visited share A_j is split w by the relay's norm and 1 - w evenly over chunks <= j
      (s_i = a_i + A_j (w r_i / sum r + (1 - w) / (j + 1)), where any relay arrived; 0 otherwise, as in AdaptivePlan);
    * `visited_weight` λ: the visited share counts λ A_j (λ < 1: the relay is assumed to carry less than the whole
      visited loss's gradient, which on language-model data is mostly local). Where chunks <= j hold no targets
      (recall) only the ratios of the carried scores matter, so λ changes nothing there; λ > 0 keeps q > 0 on a
      chunk that has a relay and no target (the library's `AdaptiveSampler(carried_weight=λ)` is this rule);
    * `realised`: spare_j = t - (chunks kept after j) - (j + 1) f instead of t - sum_{i>j} q_i: a step that kept
      nothing so far has more budget left. q_j still depends only on what is known before chunk j's draw
      (unbiased, q_j >= f > 0 where s_j > 0), but sum_j q_j <= t no longer holds on every path: E[chunks] is
      measured, not guaranteed.
    """

    relay_weight = 1.0
    visited_weight = 1.0
    realised = False

    def probability(self, chunk, counts, relay):
        """q for `chunk`, from target counts `[k]` and relay norms `[k]` (float64)."""
        total = counts.sum()
        own = counts / total if total > 0 else torch.zeros_like(counts)
        past = relay[: chunk + 1]
        if past.sum() > 0:
            split = self.relay_weight * past / past.sum() + (1 - self.relay_weight) / (chunk + 1)
            carried = self.visited_weight * own[chunk + 1 :].sum() * split
        else:
            carried = torch.zeros_like(past)
        score = own[: chunk + 1] + carried
        if score[chunk] <= 0:
            return 0.0
        spent = sum(kept for _, _, kept in self.trace) if self.realised else self.committed
        spare = max(0.0, self.budget - spent - (chunk + 1) * self.floor)
        return min(1.0, self.floor + spare * float(score[chunk] / score.sum()))


# name -> (AdaptiveSampler's floor, plan class, its knobs). `adaptive` and `adaptive-relay-blind` use AdaptivePlan
# itself (what the library runs); the others, VariantPlan. On dense data floor 1.0 is `bernoulli` (q = t/k).
VARIANTS = {
    "adaptive": (0.25, AdaptivePlan, {}),
    "adaptive-relay-blind": (0.25, AdaptivePlan, {"relay_blind": True}),
    "adaptive-floor0.5": (0.5, AdaptivePlan, {}),
    "adaptive-floor1.0": (1.0, AdaptivePlan, {}),
    "adaptive-relay-even-mix": (0.25, VariantPlan, {"relay_weight": 0.5}),
    "adaptive-carried0.25": (0.25, VariantPlan, {"visited_weight": 0.25}),
    "adaptive-carried0.1": (0.25, VariantPlan, {"visited_weight": 0.1}),
    "adaptive-realised": (0.25, VariantPlan, {"realised": True}),
    "adaptive-realised-floor0.5": (0.5, VariantPlan, {"realised": True}),
}


class ForcedPlan:
    """Mixed in before a plan class: follows `forced` decisions, then drops; `relay_blind`: q sees 1 wherever a
    relay arrived."""

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


def diagnose(model, batch: dict, policies: set[str], timings: dict | None = None) -> dict:
    """Exact statistics of each policy's estimate on `batch` (`[B, SEQ_LEN]` input_ids and labels); the seconds
    each enumeration took go into `timings` where given."""
    k = SEQ_LEN // CHUNK

    def gradient(engine) -> tuple[torch.Tensor, int]:
        model.zero_grad(set_to_none=True)
        out = engine.backward(batch["input_ids"], labels=batch["labels"])
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
        return torch.cat(grads), len(out.selected)

    def fixed(chunks):
        return gradient(SpaCO(model, chunk_size=CHUNK, sampling=FixedSelection(chunks, budget=BUDGET)))

    def adaptive_paths(name: str):
        floor, plan, knobs = VARIANTS[name]
        outcomes, stack = [], [[]]
        while stack:
            prefix = stack.pop()
            sampler = AdaptiveSampler(budget=BUDGET, seed=0, floor=floor)
            sampler.plan_class = type("Forced", (ForcedPlan, plan), {"forced": prefix, **knobs})
            estimate, count = gradient(SpaCO(model, chunk_size=CHUNK, sampling=sampler))
            points = [(q, kept) for _, q, kept in sampler.last_plan.trace if 0 < q < 1]
            stack.extend([kept for _, kept in points[:i]] + [True] for i in range(len(prefix), len(points)))
            outcomes.append((math.prod(q if kept else 1 - q for q, kept in points), estimate, count))
        return outcomes

    exact, _ = gradient(SeCO(model, chunk_size=CHUNK))
    pairs = list(itertools.combinations(range(k), BUDGET))
    q = BUDGET / k
    result = {}
    started = time.perf_counter()
    if "uniform" in policies:
        result["uniform"] = statistics([(1 / len(pairs), *fixed(s)) for s in pairs], exact)
        if timings is not None:
            timings["uniform"], started = time.perf_counter() - started, time.perf_counter()
    if "bernoulli" in policies:
        result["bernoulli"] = statistics([(q ** n * (1 - q) ** (k - n), *fixed(s)) for n in range(k + 1)
                                          for s in itertools.combinations(range(k), n)], exact)
        if timings is not None:
            timings["bernoulli"] = time.perf_counter() - started
    for name in VARIANTS:
        if name not in policies:
            continue
        started = time.perf_counter()
        result[name] = statistics(adaptive_paths(name), exact)
        print(name, f"{time.perf_counter() - started:.0f} s", flush=True)
        if timings is not None:
            timings[name] = time.perf_counter() - started
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


# On dense data adaptive-floor1.0 is bernoulli exactly (q = t/k everywhere), so it is left out there.
DENSE_POLICIES = ("adaptive,bernoulli,uniform,adaptive-carried0.25,adaptive-floor0.5,adaptive-relay-even-mix,"
                  "adaptive-relay-blind,adaptive-realised")
TRAINED_RUN = "/work/main/runs/spaco-quality/runs/dense-adaptive-steps-seed0"  # a finished dense `adaptive` run


def dense_batch() -> dict:
    """The recall batch read as language-model data: every token a target (labels = input_ids, `[8, 1024]`)."""
    batch = recall_batch()
    return {**batch, "labels": batch["input_ids"].clone()}


def dense_diagnosis(output: Path, tasks: list[str], models: list[str], policies: list[str], trained_run: str) -> dict:
    """`diagnose` on the dense and recall batches, at the demo's initial model and at `trained_run`'s final model
    (float64), one policy at a time in the order given. Results go into `output` as {task: {model: {policy:
    statistics}}} plus the seconds of each enumeration, written after each policy; an existing `output` is
    updated, so the cells can be filled by separate runs."""
    from chunkwise.recipes.run import load_trained_model

    batches = {"dense": dense_batch, "recall": recall_batch, "random-depth": random_depth_batch}
    for model_name in models:
        model = (build_tiny_model("demo-llama") if model_name == "initial" else load_trained_model(trained_run)[0]).double()
        for task in tasks:
            for policy in policies:
                timings: dict = {}
                result = diagnose(model, batches[task](), {policy}, timings)
                print(task, model_name, json.dumps(result), flush=True)
                # Re-read just before writing: another process may have filled other cells meanwhile.
                results = json.loads(output.read_text()) if output.exists() else {}
                results.setdefault("trained_run", trained_run)
                results.setdefault(task, {}).setdefault(model_name, {}).update(result)
                results.setdefault("seconds", {}).setdefault(task, {}).setdefault(model_name, {}).update(timings)
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(results, indent=1))
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/spaco/adaptive/diagnosis.json")
    parser.add_argument("--step-times", type=int, metavar="ROUNDS", help="instead: interleaved step times, ROUNDS rounds")
    parser.add_argument("--policies", help="which to enumerate, comma-separated (default: uniform,bernoulli,adaptive,"
                        "adaptive-relay-blind; with --dense, DENSE_POLICIES; on recall, uniform and bernoulli are "
                        "docs/spaco/diagnosis.json's)")
    parser.add_argument("--collect", metavar="WORK", help="instead: score the adaptive recall runs in WORK")
    parser.add_argument("--ratio", type=float, help="with --collect: adaptive's step time / SeCO's (the equal-time steps)")
    parser.add_argument("--stratification", type=int, metavar="WINDOWS", help="instead: stratified vs fresh draws")
    parser.add_argument("--stratification-tasks", default="last,everywhere")
    parser.add_argument("--dense", action="store_true", help="instead: the dense diagnosis (and the same policies on "
                        "recall) at the initial and the trained model; --policies defaults to DENSE_POLICIES")
    parser.add_argument("--tasks", default="dense,recall", help="with --dense: some of dense, recall, random-depth")
    parser.add_argument("--models", default="initial,trained", help="with --dense: initial and/or trained")
    parser.add_argument("--trained-run", default=TRAINED_RUN, help="with --dense: the run whose final model is 'trained'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dense:
        policies = (args.policies or DENSE_POLICIES).split(",")
        dense_diagnosis(Path(args.output), args.tasks.split(","), args.models.split(","), policies, args.trained_run)
        return
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
        policies = set((args.policies or "uniform,bernoulli,adaptive,adaptive-relay-blind").split(","))
        policies -= set() if task == "random-depth" else {"uniform", "bernoulli"}
        results[task] = diagnose(model, batch, policies)
        print(task, json.dumps(results[task], indent=1), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
