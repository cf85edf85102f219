"""Sharded data parallelism: DeepSpeed ZeRO-1/2/3 and FSDP2 train chunk-wise with one gradient reduction per step.

Two CPU processes (gloo) run SeCO through each engine on their own sequences, with LoRA and with full
parameters: a step of 6 chunks (two of which have no target and only relay their KV gradient), a step of 2
chunks, a step of two accumulated micro-batches, and a step where one rank has no target at all. Each rank
returns the collectives it called during each step (counted by wrapping `torch.distributed`), the full
gradients and the parameters after the optimizer step. The test process computes the same steps in one
process (the mean of the per-rank SeCO gradients, then the same SGD update) and compares.

The same two processes then run `ChunkwiseTrainer` and plain `Trainer` (the reference of test_hf_trainer.py)
under `TrainingArguments(deepspeed=...)` and on a model transformers shards with FSDP2 as it loads it: one
pair of processes per engine, because starting one (and DeepSpeed in it) costs more than the tests it runs.

Precision: FSDP2 trains float64, compared at 1e-10 relative. DeepSpeed trains float32 only (its engine takes
float32 as the model dtype unless fp16/bf16 is on, `DeepSpeedEngine.get_data_types`, and communicates in fp16, bf16 or
fp32 only, `communication_data_type`), so its gradients are compared within what float32 allows
(`float32_tolerances`): each rank runs the same float32 chunks as the one-process reference; what differs is the
order in which DeepSpeed sums the m contributions to a gradient entry (each chunk's backward, each micro-batch, each
rank: its own accumulation buffers, the all-reduce or reduce-scatter, the 1/W scaling). Two orders of the same float32
sum differ by at most 2(m - 1)u sum_c |g_c| (u = 2^-24), which the reference measures per entry while it accumulates
(`single_process`). Measured differences sit far below those bounds: gradients equal bit for bit under ZeRO-1/2 and
within 5e-7 of each tensor's largest entry under ZeRO-3, parameters within 1.1e-7; FSDP2: gradients bit for bit,
parameters within 1.6e-16. A wrong normalisation or a lost chunk is off by 1e-1 or more; the bounds stay below 1e-3.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from multirank import CollectiveLog, run_ranks
from reference import U32, max_relative_error

from chunkwise import SeCO, SpaCO
from chunkwise.core.sampling import ChunkSampler, StepPlan
from chunkwise.core.sync import shard_fsdp2
from chunkwise.integrations.trainer import ChunkwiseConfig, ChunkwiseTrainer
from chunkwise.models.loading import add_lora
from chunkwise.models.presets import build_tiny_model

WORLD, SEQ = 2, 24
LR = 0.1
MODES = ("lora", "full")
DS_STAGES = (1, 2, 3)


def rank_batch(rank: int, step: int, labels: str = "all") -> dict:
    """Rank `rank`'s micro-batch number `step`: `input_ids` `[1, SEQ]` and `labels`.

    labels: "all" (every next token is a target); "middle" (tokens 5..12 are not: with 4-token chunks,
    chunks 1 and 2 have no target and only relay their KV gradient, through the transformer body alone);
    "none on rank 1" (rank 1 has no target at all, yet must join the step's reduction); "end" (targets in the last
    4 tokens only: the last chunk holds them all, the others are reached by the relay alone).
    """
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(100 * step + rank))
    targets = ids.clone()
    if labels == "middle":
        targets[:, 5:13] = -100
    elif labels == "none on rank 1" and rank == 1:
        targets[:] = -100
    elif labels == "end":
        targets[:, : SEQ - 3] = -100  # labels are shifted inside: the last 3 predictions, all in the last chunk
    return {"input_ids": ids, "labels": targets}


# What each step does on rank r: (name, chunk size, [(micro-batch, labels, num_items)]). num_items is the
# step's targets per rank, as `chunkwise train` and Trainer pass it, so the reduced mean is the whole batch's.
STEPS = [
    ("6 chunks", 4, [(0, "middle", None)]),
    ("2 chunks", 12, [(1, "all", None)]),
    ("accumulation", 4, [(2, "middle", 2 * (SEQ - 1)), (3, "all", 2 * (SEQ - 1))]),
    ("rank without targets", 4, [(4, "none on rank 1", SEQ - 1)]),
]


def build_model(mode: str, dtype: torch.dtype) -> torch.nn.Module:
    """tiny-llama, full or with LoRA on q/v (B perturbed from zero so that A's gradient is not zero)."""
    if mode == "full":
        return build_tiny_model("tiny-llama", dtype=dtype, seed=0)
    # The adapter is drawn in float32 and then cast, as build_tiny_model draws its weights: the same LoRA model
    # in either dtype.
    model = build_tiny_model("tiny-llama", dtype=torch.float32, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # LoRA's A is drawn from the global generator
        model = add_lora(model, rank=4, alpha=8, random_b=0.05, seed=1)
    return model.to(dtype)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def run_steps(rank: int, engines: dict, log: CollectiveLog, *, before_micro_batch, full_grad, full_param, step) -> dict:
    """The STEPS on this rank: collectives, gradients and parameters after each (see the module docstring)."""
    results = {}
    for name, chunk_size, micro_batches in STEPS:
        with log.recording():
            for number, (index, labels, num_items) in enumerate(micro_batches):
                before_micro_batch(last=number == len(micro_batches) - 1)
                engines[chunk_size].backward(**rank_batch(rank, index, labels), num_items=num_items)
            calls = list(log.calls)
        grads = full_grad()
        step()
        results[name] = {"calls": calls, "grads": grads, "params": full_param()}
    return results


# ----- DeepSpeed -----------------------------------------------------------------------------------------------


def deepspeed_worker(rank: int, environment: dict, out_dir: str) -> dict:
    os.environ.update(environment, LOCAL_RANK=str(rank))
    log = CollectiveLog()  # before DeepSpeed starts: it keeps references to torch.distributed's functions
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the process group the harness set up
    results = {}
    for stage in DS_STAGES:
        for mode in MODES:
            model = build_model(mode, torch.float32)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
                "zero_allow_untested_optimizer": True,  # plain SGD, so that an update is the gradient
                # Partition every ZeRO-3 parameter: tiny ones stay whole on every rank by default.
                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            }
            optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=LR)
            ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            engines = {size: SeCO(ds, chunk_size=size) for size in (4, 12)}
            results[stage, mode] = run_steps(
                rank, engines, log,
                before_micro_batch=lambda last: ds.set_gradient_accumulation_boundary(last),
                full_grad=lambda: {n: safe_get_full_grad(p).clone() for n, p in trainable(model)},
                full_param=lambda: {n: safe_get_full_fp32_param(p).clone() for n, p in trainable(model)},
                step=ds.step,
            )
            if stage == 2 and mode == "full":
                # The paper's 8-GPU recipe: ZeRO-2 with the KV cache in host memory.
                offload = SeCO(ds, chunk_size=4, offload_kv=True)
                with log.recording():
                    offload.backward(**rank_batch(rank, 5, "middle"))
                results["offload"] = {"calls": list(log.calls), "grads": {n: safe_get_full_grad(p).clone() for n, p in trainable(model)}}
                ds.step()
            if stage == 3 and mode == "full":
                results["adaptive"] = adaptive_step(rank, ds, trainable(model), safe_get_full_grad, safe_get_full_fp32_param)
                # Sequences of different lengths: 6 chunks on rank 0, 7 on rank 1.
                results["lockstep"] = refusal(lambda: engines[4].backward(torch.randint(0, 128, (1, SEQ + 4 * rank))))
    # Without ZeRO, DeepSpeed reduces inside its own backward: refused when the engine is built.
    model = build_model("full", torch.float32)
    ds, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                  config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}})
    results["stage 0"] = refusal(lambda: SeCO(ds, chunk_size=4))
    results["trainer"] = deepspeed_trainers(rank, out_dir)
    return results


def adaptive_step(rank: int, ds, parameters: list, full_grad, full_param) -> dict:
    """One `adaptive` SpaCO step under ZeRO-3, each rank with its own data and its own sampler seed.

    ZeRO-3 gathers parameters in hooks on every module, so both ranks must visit the same chunks: the policy's
    decisions are agreed (targets and relay norms summed over ranks, rank 0's draw). The seeds differ so that
    the draws differ: ranks that decided alone would part ways (alone, rank 0 would keep chunk 3 and rank 1
    chunk 2). 6 chunks, budget 2, the targets in the last chunk (kept with q = 1), the earlier chunks reached by
    the relay only (kept with 0 < q < 1).
    """
    engine = SpaCO(ds, chunk_size=4, budget=2, sampling="adaptive", seed=12 + rank)
    before = {n: full_param(p).clone() for n, p in parameters}
    out = engine.backward(**rank_batch(rank, 6, "end"))
    result = {"trace": engine.sampler.last_plan.trace, "selected": out.selected, "factors": out.factors,
              "before": before, "grads": {n: full_grad(p).clone() for n, p in parameters}}
    ds.step()
    return result


def refusal(action) -> str:
    """The message of the error `action` raises (or a note that it raised none)."""
    try:
        action()
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def deepspeed_trainers(rank: int, out_dir: str) -> dict:
    """Plain Trainer and ChunkwiseTrainer with `TrainingArguments(deepspeed=...)`, ZeRO stages 1-3 (float32)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from trainer_helpers import CHUNK, Float64LossTrainer, ListDataset, make_rows, training_args

    # What accelerate reads to see a 2-process run (the harness has joined the process group).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    model = build_tiny_model("tiny-llama", dtype=torch.float32)
    results = {}
    for stage in DS_STAGES:
        config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}
        for name, cls in (("plain", Float64LossTrainer), ("chunkwise", ChunkwiseTrainer)):
            m = copy.deepcopy(model)
            extra = {"chunkwise": ChunkwiseConfig(chunk_size=CHUNK)} if cls is ChunkwiseTrainer else {}
            args = training_args(Path(out_dir) / f"{name}{stage}", gradient_accumulation_steps=2, max_grad_norm=10.0,
                                 ddp_backend="gloo", deepspeed=config)
            output = cls(model=m, args=args, train_dataset=ListDataset(make_rows(8)), **extra).train()
            weights = {n: safe_get_full_fp32_param(p).clone() for n, p in m.named_parameters() if p.requires_grad}
            results[stage, name] = (weights, output.training_loss)
    return results


# ----- FSDP2 ----------------------------------------------------------------------------------------------------


def fsdp_worker(rank: int, out_dir: str, model_dir: str) -> dict:
    log = CollectiveLog()
    results = {}
    for mode in MODES:
        model = shard_fsdp2(build_model(mode, torch.float64))
        optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=LR)
        engines = {size: SeCO(model, chunk_size=size) for size in (4, 12)}
        lm = model.get_base_model() if mode == "lora" else model

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[mode] = run_steps(
            rank, engines, log,
            before_micro_batch=lambda last: lm.set_requires_gradient_sync(last),
            full_grad=lambda: {n: p.grad.full_tensor().clone() for n, p in trainable(model)},
            full_param=lambda: {n: p.detach().full_tensor().clone() for n, p in trainable(model)},
            step=step,
        )
    # Shardings that cannot work: layers sharded but not the model (its embeddings and head would never be
    # reduced), and the root fully_shard on a PEFT wrapper instead of the causal LM inside.
    from torch.distributed.fsdp import fully_shard

    model = build_model("full", torch.float64)
    for layer in model.model.layers:
        fully_shard(layer)
    results["layers only"] = refusal(lambda: SeCO(model, chunk_size=4))
    model = build_model("lora", torch.float64)
    fully_shard(model)
    results["peft root"] = refusal(lambda: SeCO(model, chunk_size=4))
    results["trainer"] = fsdp_trainers(rank, out_dir, model_dir)
    return results


def fsdp_trainers(rank: int, out_dir: str, model_dir: str) -> dict:
    """Plain Trainer and ChunkwiseTrainer on a model transformers shards with FSDP2 as it loads it (float64)."""
    from trainer_helpers import CHUNK, Float64LossTrainer, ListDataset, make_rows, training_args
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    results = {}
    for name, cls in (("plain", Float64LossTrainer), ("chunkwise", ChunkwiseTrainer)):
        m = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=WORLD), dtype=torch.float64)
        extra = {"chunkwise": ChunkwiseConfig(chunk_size=CHUNK)} if cls is ChunkwiseTrainer else {}
        args = training_args(Path(out_dir) / name, gradient_accumulation_steps=2, max_grad_norm=10.0, ddp_backend="gloo")
        trainer = cls(model=m, args=args, train_dataset=ListDataset(make_rows(8)), **extra)
        output = trainer.train()
        assert type(trainer.model_wrapped).__name__.startswith("FSDP")  # transformers' own FSDP2 model, not re-wrapped
        weights = {n: p.detach().full_tensor().clone() for n, p in m.named_parameters() if p.requires_grad}
        results[name] = (weights, output.training_loss)
    return results


# ----- one process doing the same ---------------------------------------------------------------------------------


def single_process(mode: str, dtype: torch.dtype, ranks: list[dict]) -> dict:
    """The STEPS in one process: the mean over ranks of each rank's SeCO gradient, then the same SGD update.

    Each step starts from the parameters rank 0 reached (the previous step is checked on its own): after an
    update this tiny model's attention gradients move by ~1e-7 for a 1e-16 change of the parameters, which
    would otherwise hide what the engines do behind float64's last bit.

    Also returns, per step, the float32 tolerances of `float32_tolerances`: while the gradients accumulate, every
    contribution to `.grad` (a chunk's backward) is recorded, so sum_c |g_c| and the count m are measured.
    """
    model = build_model(mode, dtype)
    results = {}
    with ContributionRecorder(model) as recorder:
        for number, (name, chunk_size, micro_batches) in enumerate(STEPS):
            if number:
                with torch.no_grad():
                    for n, p in trainable(model):
                        p.copy_(ranks[0][STEPS[number - 1][0]]["params"][n])

            def rank_step(rank, chunk_size=chunk_size, micro_batches=micro_batches):
                engine = SeCO(model, chunk_size=chunk_size)
                for index, labels, num_items in micro_batches:
                    engine.backward(**rank_batch(rank, index, labels), num_items=num_items)

            total, magnitude, terms = recorder.mean_over_ranks(rank_step)
            with torch.no_grad():
                for n, p in trainable(model):
                    p -= LR * total[n]
            results[name] = {"grads": total, "params": {n: p.detach().clone() for n, p in trainable(model)},
                             "tolerances": float32_tolerances(total, magnitude, terms, results_params(model))}
            model.zero_grad(set_to_none=True)
    return results


class ContributionRecorder:
    """Records every contribution to each trainable parameter's `.grad` (a chunk's backward): sum_c |g_c| and m.

    Used as a context manager around the one-process reference; `mean_over_ranks` runs one step per rank.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self.sizes, self.counts, self.handles = model, {}, {}, []

    def __enter__(self):
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in trainable(self.model)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, name):
        def hook(p):  # after each accumulation into p.grad: the contribution is the increment
            previous = self.sizes.setdefault(name, [torch.zeros_like(p), torch.zeros_like(p)])
            previous[1] += (p.grad - previous[0]).abs()
            previous[0] = p.grad.detach().clone()
            self.counts[name] = self.counts.get(name, 0) + 1
        return hook

    def mean_over_ranks(self, rank_step) -> tuple[dict, dict, dict]:
        """`rank_step(rank)` for each rank from zero gradients: (mean gradient, mean sum_c |g_c|, total m) per name."""
        total, magnitude, terms = {}, {}, {}
        for rank in range(WORLD):
            self.model.zero_grad(set_to_none=True)
            self.sizes.clear(), self.counts.clear()
            rank_step(rank)
            for n, p in trainable(self.model):  # no gradient at all: a rank without targets adds nothing
                total[n] = total.get(n, torch.zeros_like(p)) + (0 if p.grad is None else p.grad / WORLD)
                magnitude[n] = magnitude.get(n, 0) + (0 if n not in self.sizes else self.sizes[n][1] / WORLD)
                terms[n] = terms.get(n, 0) + self.counts.get(n, 0)
        return total, magnitude, terms


class ReplayPlan(StepPlan):
    """Stage 2 decides as a recorded `adaptive` trace did: chunk j kept with factor 1/q_j where it was kept."""

    online = True

    def __init__(self, trace: list[tuple[int, float, bool]]):
        self.factors = {chunk: 1.0 / q for chunk, q, kept in trace if kept}

    def decide(self, chunk, state):
        return self.factors.get(chunk)


class ReplaySampler(ChunkSampler):
    """A sampler whose every step replays one recorded trace (the one-process reference of an agreed step)."""

    name = "replay"

    def __init__(self, trace: list):
        super().__init__(budget=2)
        self.trace = trace

    def plan(self, num_chunks: int) -> StepPlan:
        return ReplayPlan(self.trace)

    def _draw(self, num_chunks: int) -> tuple[int, ...]:
        raise TypeError("ReplaySampler decides in stage 2")


def adaptive_reference(ranks: list[dict]) -> dict:
    """The agreed `adaptive` step in one process: each rank's SpaCO gradient with rank 0's trace replayed, averaged."""
    model = build_model("full", torch.float32)
    with torch.no_grad():
        for n, p in trainable(model):
            p.copy_(ranks[0]["before"][n])
    with ContributionRecorder(model) as recorder:
        engine = SpaCO(model, chunk_size=4, sampling=ReplaySampler(ranks[0]["trace"]))
        total, magnitude, terms = recorder.mean_over_ranks(lambda rank: engine.backward(**rank_batch(rank, 6, "end")))
    params = {n: p.detach() for n, p in trainable(model)}
    return {"grads": total, "params": {}, "tolerances": float32_tolerances(total, magnitude, terms, params)}


def results_params(model) -> dict:
    return {n: p.detach() for n, p in trainable(model)}


def float32_tolerances(grads: dict, magnitude: dict, terms: dict, params: dict) -> dict:
    """Per tensor, (gradient, parameter) tolerances relative to its largest entry, for float32 DeepSpeed.

    Gradient: the m contributions summed in another order (module docstring): 2(m - 1)u max(sum_c |g_c|) / max|g|,
    plus 2u for the 1/W scaling, x2 for second-order terms. Parameters after p - LR g: LR times the gradient's
    bound, plus the rounding of the update (2u |p|), relative to max |p|.
    """
    out = {}
    for n, g in grads.items():
        scale = float(g.abs().max()) if torch.is_tensor(g) else 0.0
        if scale == 0.0:
            out[n] = (0.0, 2 * U32)
            continue
        m = terms[n]
        bound = 2 * (2 * max(m - 1, 0) * U32 * float(magnitude[n].max()) + 2 * U32 * scale)
        p_scale = float(params[n].abs().max())
        out[n] = (bound / scale, (LR * bound + 2 * U32 * p_scale) / p_scale)
    return out


def assert_matches(ranks: list[dict], reference: dict, *, rtol: float | None, what: str) -> None:
    """Each rank's gradients and parameters against the reference's, relative to each tensor's largest entry, within
    `rtol`, or (None) within the reference's derived float32 tolerances, which must stay below 1e-3."""
    for index, key in enumerate(("grads", "params")):
        for name, expected in reference[key].items():
            tol = rtol if rtol is not None else reference["tolerances"][name][index]
            assert tol < 1e-3, f"{what}: the float32 bound {tol:.2e} of {name} would not catch a 1e-1 error"
            for rank in ranks:
                scale = expected.abs().max().clamp_min(1e-30)
                error = float((rank[key][name].to(expected.dtype) - expected).abs().max() / scale)
                assert error <= tol, f"{what}: {key} of {name} differ by {error:.2e} of its largest entry (bound {tol:.2e})"


# ----- the tests ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_ranks(deepspeed_cpu, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepspeed")
    return run_ranks(deepspeed_worker, WORLD, folder / "ranks", args=(deepspeed_cpu, str(folder)))


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    build_tiny_model("tiny-llama", dtype=torch.float32).save_pretrained(folder / "model")
    return run_ranks(fsdp_worker, WORLD, folder / "ranks", args=(str(folder), str(folder / "model")))




# The reduction each DeepSpeed stage issues once per step for this model (all its gradients fit one bucket).
DS_REDUCTION = {1: ["all_reduce"], 2: ["all_reduce"], 3: ["reduce_scatter_tensor"]}


@pytest.mark.parametrize("stage", DS_STAGES)
@pytest.mark.parametrize("mode", MODES)
def test_deepspeed_zero_equals_one_process(deepspeed_ranks, stage, mode):
    ranks = [r[stage, mode] for r in deepspeed_ranks]
    reference = single_process(mode, torch.float32, ranks)
    for name, _, _ in STEPS:
        assert_matches([r[name] for r in ranks], reference[name], rtol=None, what=f"ZeRO-{stage} {mode}, {name}")


@pytest.mark.parametrize("stage", DS_STAGES)
@pytest.mark.parametrize("mode", MODES)
def test_deepspeed_reduces_once_per_step_whatever_the_chunks(deepspeed_ranks, stage, mode):
    for rank in deepspeed_ranks:
        for name, _, _ in STEPS:
            calls = rank[stage, mode][name]["calls"]
            assert [c for c in calls if c in ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter")] == DS_REDUCTION[stage], (name, calls)


def test_adaptive_spaco_decides_alike_on_every_zero3_rank(deepspeed_ranks):
    """ZeRO-3 with `adaptive` SpaCO: ranks with different data and different sampler seeds take the same decisions
    (the same q at every chunk, the same chunks kept), and the reduced gradient is the mean of each rank's gradient
    under those decisions, computed in one process (float32 bounds as above)."""
    ranks = [r["adaptive"] for r in deepspeed_ranks]
    assert ranks[0]["trace"] == ranks[1]["trace"]
    assert ranks[0]["selected"] == ranks[1]["selected"] and ranks[0]["factors"] == ranks[1]["factors"]
    # The last chunk (all the targets) was kept; earlier chunks had real draws (0 < q < 1) and some were skipped:
    # decisions the ranks could have taken apart.
    trace = ranks[0]["trace"]
    assert trace[0] == (5, 1.0, True) and any(0 < q < 1 for _, q, _ in trace) and 2 <= len(ranks[0]["selected"]) < 6
    assert_matches(ranks, adaptive_reference(ranks), rtol=None, what="ZeRO-3 adaptive")


def test_kv_offload_with_zero2(deepspeed_ranks):
    """The paper's recipe, ZeRO-2 with the KV cache in host memory: one process's gradient, one all-reduce."""
    model = build_model("full", torch.float32)
    with torch.no_grad():  # the parameters the offload step started from
        for n, p in trainable(model):
            p.copy_(deepspeed_ranks[0][2, "full"][STEPS[-1][0]]["params"][n])
    expected = {}
    for rank in range(WORLD):
        model.zero_grad(set_to_none=True)
        SeCO(model, chunk_size=4).backward(**rank_batch(rank, 5, "middle"))
        for n, p in trainable(model):
            expected[n] = expected.get(n, 0) + p.grad / WORLD
    for rank in deepspeed_ranks:
        assert rank["offload"]["calls"].count("all_reduce") == 1
        # Offloading changes no bit (test_offload); what differs is the order of the float32 sum of the 2 ranks' gradients
        # (all-reduce, then 1/W) against (a + b) / 2 here: <= 2u (|a| + |b|) / 2 per entry, relative to the entry's
        # terms; with ZeRO-2's bucket accumulating the chunks in autograd's order. rtol 1e-5 = 84 x 2u allows a
        # cancellation between the ranks' gradients of 84 (atol 1e-7 for entries whose ranks' terms cancel to ~0).
        for n, grad in expected.items():
            torch.testing.assert_close(rank["offload"]["grads"][n], grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_equals_one_process(fsdp_ranks, mode):
    ranks = [r[mode] for r in fsdp_ranks]
    reference = single_process(mode, torch.float64, ranks)
    for name, _, _ in STEPS:
        assert_matches([r[name] for r in ranks], reference[name], rtol=1e-10, what=f"FSDP2 {mode}, {name}")


def groups_with_gradients(mode: str) -> int:
    """FSDP2 groups (`shard_fsdp2`: each layer, and the root holding the rest) that own a trainable parameter."""
    lm = build_model(mode, torch.float32)
    lm = lm.get_base_model() if mode == "lora" else lm
    in_layers = {id(p) for layer in lm.model.layers for p in layer.parameters()}
    layers = sum(any(p.requires_grad for p in layer.parameters()) for layer in lm.model.layers)
    return layers + any(p.requires_grad for p in lm.parameters() if id(p) not in in_layers)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_reduce_scatters_each_group_once_per_step(fsdp_ranks, mode):
    groups = groups_with_gradients(mode)
    for rank in fsdp_ranks:
        for name, _, _ in STEPS:
            calls = rank[mode][name]["calls"]
            # One reduce-scatter per group holding gradients, at the step's last backward; each group's parameters
            # gathered once, at the step's first forward, and kept for all chunks and micro-batches.
            assert sorted(calls) == ["all_gather_single"] * 3 + ["reduce_scatter_single"] * groups, (name, calls)


# ----- ChunkwiseTrainer against plain Trainer ------------------------------------------------------------------------


def trainer_updates(ranks: list[dict], dtype: torch.dtype) -> list[tuple[float, float, float]]:
    """Per rank: (largest relative difference of the parameter updates, chunkwise loss, plain loss)."""
    from trainer_helpers import updates

    before = {n: p.detach().clone() for n, p in build_tiny_model("tiny-llama", dtype=dtype).named_parameters()}
    return [(max_relative_error(updates(r["chunkwise"][0], before), updates(r["plain"][0], before)), r["chunkwise"][1], r["plain"][1])
            for r in ranks]


@pytest.mark.parametrize("stage", DS_STAGES)
def test_trainer_with_deepspeed_matches_plain_trainer(deepspeed_ranks, stage):
    """TrainingArguments(deepspeed=...): the same update as plain Trainer under the same DeepSpeed config
    (gradient accumulation 2, clipping). float32, DeepSpeed's precision. Derivation (u = 2^-24):
    * updates: an update is the difference of two float32 weights, each rounded by u |w|: relative to the largest
      update, 2u max|w| / max|update| (RMSNorm weights are 1 and their updates ~1e-2: ~1.2e-5; measured 1.4e-5 with
      each stage, as for the same comparison in one process without DeepSpeed), plus the gradients' float32 error
      (test_seco_exactness.F32_TOL's derivation: <= 1e-5 worst case). 1e-4 covers both.
    * loss: float32 cross-entropy of a chunked vs a full forward: test_seco_exactness.F32_TOL's derivation for the
      loss (<= 9e-6 relative worst case, over n <= 46 targets a micro-batch and V = 128), x2: 2e-5 (was 1e-6, below it).
    A wrong normalisation or a lost chunk is off by >= 1e-1."""
    ranks = [{name: r["trainer"][stage, name] for name in ("plain", "chunkwise")} for r in deepspeed_ranks]
    for error, chunk_loss, plain_loss in trainer_updates(ranks, torch.float32):
        assert error < 1e-4, f"ZeRO-{stage}: parameter updates differ by {error:.3g} relative"
        assert math.isclose(chunk_loss, plain_loss, rel_tol=2e-5), (chunk_loss, plain_loss)


def test_trainer_on_transformers_fsdp2_model_matches_plain_trainer(fsdp_ranks):
    """from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2)) hands Trainer an FSDP2 model, whose
    gradient accumulation Trainer defers with set_requires_gradient_sync, which the engine follows. float64."""
    for error, chunk_loss, plain_loss in trainer_updates([r["trainer"] for r in fsdp_ranks], torch.float64):
        assert error < 1e-10, f"FSDP2: parameter updates differ by {error:.3g} relative"
        assert math.isclose(chunk_loss, plain_loss, rel_tol=1e-10), (chunk_loss, plain_loss)


def test_refused_set_ups_say_why(deepspeed_ranks, fsdp_ranks):
    for rank in deepspeed_ranks:
        assert rank["lockstep"].startswith("ValueError: ZeRO-3 gathers every parameter") and "[6, 7] chunks" in rank["lockstep"]
        assert rank["stage 0"].startswith("TypeError: DeepSpeed without ZeRO (zero_optimization.stage 0)")
    for rank in fsdp_ranks:
        assert rank["layers only"].startswith("TypeError: the model's layers are sharded with fully_shard but the model itself is not")
        assert rank["peft root"].startswith("TypeError: apply the root fully_shard to the Hugging Face causal LM (LlamaForCausalLM) itself")
