"""DistributedDataParallel: two CPU processes (gloo) train chunk-wise with one all-reduce per step.

Each rank runs SeCO on its own sequences through the DDP-wrapped model. The engine bypasses the
wrapper for every chunk but the step's last backward, so DDP's reducer all-reduces the gradient
accumulated over all chunks once. The test checks the result equals the mean of the per-rank SeCO
gradients computed in one process, and counts the all-reduce calls with a DDP communication hook.
"""

import pytest
import torch
from multirank import assert_launch_succeeded, run_launcher, run_ranks, torchrun
from tiny_models import random_ids
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from chunkwise import SeCO
from chunkwise.models.presets import build_tiny_model

WORLD, SEQ, CHUNK = 2, 21, 4  # 6 chunks per sequence


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return random_ids(1, SEQ, seed=100 * step + rank)


def worker(rank: int) -> dict:
    """One rank's three steps, in the process group the harness set up; returns what the tests check."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64, seed=0)
    ddp = DistributedDataParallel(model)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    engine = SeCO(ddp, chunk_size=CHUNK)
    results = {}

    # Step 1: one micro-batch.
    engine.backward(rank_batch(rank, 0))
    results["step1"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    results["calls1"] = len(calls)

    # Step 2: gradient accumulation over two micro-batches, the first inside no_sync().
    model.zero_grad(set_to_none=True)
    calls.clear()
    with ddp.no_sync():
        engine.backward(rank_batch(rank, 1), num_items=2 * (SEQ - 1))
    results["calls_inside_no_sync"] = len(calls)
    engine.backward(rank_batch(rank, 2), num_items=2 * (SEQ - 1))
    results["step2"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    results["calls2"] = len(calls)

    # Step 3: this rank has nothing to predict; it must still join the other rank's all-reduce.
    model.zero_grad(set_to_none=True)
    calls.clear()
    ids = rank_batch(rank, 3)
    labels = torch.full_like(ids, -100) if rank == 1 else ids
    engine.backward(ids, labels=labels, num_items=SEQ - 1)
    results["step3"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    results["calls3"] = len(calls)
    results["buckets"] = len(set(calls))
    return results


def single_process_grads(batches: list[tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
    model = build_tiny_model("tiny-llama", dtype=torch.float64, seed=0)
    engine = SeCO(model, chunk_size=CHUNK)
    for ids, kwargs in batches:
        engine.backward(ids, **kwargs)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(worker, WORLD, tmp_path_factory.mktemp("ddp"))


def assert_mean_of_ranks(ranks, key, per_rank_batches):
    per_rank = [single_process_grads(batches) for batches in per_rank_batches]
    for name in per_rank[0]:
        expected = sum(g[name] for g in per_rank) / WORLD
        for rank in ranks:
            torch.testing.assert_close(rank[key][name], expected, rtol=1e-12, atol=1e-15, msg=name)


def test_ddp_gradient_is_the_mean_of_per_rank_seco(ranks):
    assert_mean_of_ranks(ranks, "step1", [[(rank_batch(r, 0), {})] for r in range(WORLD)])


def test_one_bucketed_all_reduce_per_step_not_one_per_chunk(ranks):
    buckets = ranks[0]["buckets"]
    assert buckets >= 1
    for rank in ranks:
        assert rank["calls1"] == buckets  # 6 chunks, one all-reduce of each bucket
        assert rank["calls_inside_no_sync"] == 0
        assert rank["calls2"] == buckets


def test_gradient_accumulation_with_no_sync(ranks):
    kwargs = {"num_items": 2 * (SEQ - 1)}
    assert_mean_of_ranks(
        ranks, "step2", [[(rank_batch(r, 1), kwargs), (rank_batch(r, 2), kwargs)] for r in range(WORLD)]
    )


def test_rank_without_targets_still_joins_the_all_reduce(ranks):
    for rank in ranks:
        assert rank["calls3"] == ranks[0]["buckets"]
    # Rank 1 contributes zero: the result is half of rank 0's gradient.
    only_rank0 = single_process_grads([(rank_batch(0, 3), {"num_items": SEQ - 1})])
    for name, grad in only_rank0.items():
        torch.testing.assert_close(ranks[1]["step3"][name], grad / WORLD, rtol=1e-12, atol=1e-15, msg=name)


def test_torchrun_example_runs_as_documented(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code, output = run_launcher(torchrun("--nproc_per_node", "2", "examples/torchrun_seco.py"), tmp_path, cwd=root)
    assert_launch_succeeded(code, output)
    assert "step 4: loss" in output
