"""The multi-process harness fails fast and names the rank, and `chunkwise train` does not hang its users.

* A rank killed in the middle of a SeCO step fails `run_ranks` at once (not after the process-group
  timeout), naming that rank and how it ended.
* A rank that stalls fails `run_ranks` when its wall-clock limit passes, with every rank's Python
  stacks dumped into the logs quoted in the failure.
* Under torchrun, when a rank of `chunkwise train` stops answering, the others stop within
  `--dist-timeout` with a one-line error that says what happened and that checkpoints are intact.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from multirank import RUN_TIMEOUT, Launched, RanksFailed, SpawnedRanks, assert_launch_succeeded, run_ranks, torchrun

from chunkwise import SeCO
from chunkwise.models.presets import build_tiny_model
from chunkwise.recipes.train.distributed import is_lost_rank


def killed_mid_step(rank: int) -> dict:
    """Both ranks start a DDP SeCO step; rank 1 is SIGKILLed in its second chunk's stage-2 forward."""
    model = build_tiny_model("tiny-llama", seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    forwards = []

    def die_in_stage_2(module, args):
        forwards.append(torch.is_grad_enabled())
        if rank == 1 and sum(forwards) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    model.model.layers[0].register_forward_pre_hook(die_in_stage_2)
    SeCO(ddp, chunk_size=8).backward(torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(rank)))
    return {"finished": True}


def stalls(rank: int) -> dict:
    if rank == 1:
        print("stalling", flush=True)
        time.sleep(3600)
    torch.distributed.barrier()  # rank 0 waits for rank 1 here
    return {}


def test_a_rank_killed_mid_step_fails_at_once_naming_it(tmp_path):
    # The failure names the dead rank as soon as it is seen, not "gave no result" at the time limit.
    with pytest.raises(RanksFailed, match=r"rank 1 ended without a result \(killed by SIGKILL\)") as failure:
        run_ranks(killed_mid_step, 2, tmp_path)
    assert "----- rank 1 log" in str(failure.value)


def test_a_stalled_rank_fails_within_the_time_limit_with_stacks(tmp_path):
    with SpawnedRanks(stalls, 2, tmp_path) as ranks:
        while "stalling" not in ranks.log(1):  # start-up done (it can take long on a busy machine)
            assert time.monotonic() - ranks.started < RUN_TIMEOUT, ranks.log(1)
            time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(RanksFailed, match=r"ranks \[0, 1\] gave no result within 5 s") as failure:
            ranks.wait(timeout=5)
        assert time.monotonic() - started < 20  # the limit, then 1 s for the stack dumps and the kills
    # faulthandler's dump, written by each rank when the harness asked before killing it.
    assert "in stalls" in str(failure.value)


def test_gloo_failures_are_recognised_as_a_lost_rank():
    # The two messages gloo 2.13 raises (seen with a SIGKILLed peer and with a silent one).
    closed = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:55448.")
    silent = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete")
    assert is_lost_rank(closed) and is_lost_rank(silent)
    assert is_lost_rank(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not is_lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_launch_check_accepts_only_a_teardown_abort():
    launcher_trace = "Traceback (most recent call last):\n  ...\nChildFailedError:\n"
    abort = "step 4: loss 4.8\nterminate called without an active exception\n" + launcher_trace + "  exitcode  : -6 (pid: 7)\n"
    with pytest.warns(UserWarning, match="accepted a gloo teardown abort"):
        assert_launch_succeeded(1, abort)
    assert_launch_succeeded(0, "anything")
    worker_error = "Traceback (most recent call last):\nValueError: bad\n" + abort
    for output in (worker_error, launcher_trace + "  exitcode  : 1 (pid: 7)\n"):
        with pytest.raises(RanksFailed, match="launcher exit code 1"):
            assert_launch_succeeded(1, output)


def test_torchrun_train_stops_with_a_clear_error_when_a_rank_stops_answering(tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0 gives up after --dist-timeout and says why."""
    timeout = 15
    output = tmp_path / "run"
    command = torchrun(
        "--nproc_per_node", "2", "-m", "chunkwise.cli", "train", "--seq-len", "48", "--chunk-size", "16", "--steps", "100000",
        "--checkpoint-every", "0", "--eval-every", "0", "--no-progress", "--dist-timeout", str(timeout), "--output", str(output),
    )
    with Launched(command, tmp_path / "launch", env={**os.environ, "OMP_NUM_THREADS": "1"}) as launched:
        deadline = time.monotonic() + 300
        while not _steps_done(output / "metrics.jsonl"):  # both ranks are past start-up and stepping
            assert launched.process.poll() is None and time.monotonic() < deadline, launched.output()[-3000:]
            time.sleep(0.2)
        frozen = launched.worker_pids()[1]
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        message = "rank 0 of 2 stopped: it lost contact with another rank"
        while message not in launched.output():
            assert time.monotonic() - frozen_at < timeout + 60, launched.output()[-3000:]
            time.sleep(0.2)
        waited = time.monotonic() - frozen_at
        os.kill(frozen, signal.SIGKILL)
        code, text = launched.wait(60)
    assert code != 0
    assert timeout - 1 < waited < timeout + 60  # the timeout, plus what is left of rank 0's step on a busy machine
    assert f"--dist-timeout {timeout} s" in text and "continue with --resume" in text
    (line,) = [line for line in text.splitlines() if message in line]  # one line, not a stack trace
    assert line.startswith("chunkwise train: rank 0 of 2 stopped")


def _steps_done(metrics) -> int:
    if not metrics.exists():
        return 0
    return metrics.read_text().count('"kind": "train"')  # rank 0 writes a line per step
