"""Multi-process tests that neither hang nor fail by chance.

Two ways to run several ranks, both with a hard wall-clock limit and per-rank logs:

* `run_ranks(fn, ...)` spawns `world_size` Python processes that each join a gloo process group through
  a `FileStore` in the test's own folder (no TCP port to pick, so no race between picking a free port and
  binding it), run `fn(rank, *args)`, and write its return value to `rank{r}.pt`. The test judges those
  files, never a rank's exit code.
* `run_launcher(command, ...)` runs a launcher (torchrun, accelerate) in its own process group, so the
  workers it starts are killed with it; its output goes to a file, not a pipe a stray worker could hold.

Why each rank ends with `os._exit(0)`: on this machine gloo sometimes aborts a process while it tears
down ("terminate called without an active exception", SIGABRT), after all its results were written.
That abort is gloo's, not ours, so workers skip the teardown: once its result is saved, a rank waits at
a barrier (so no rank leaves while another still needs it for a collective), flushes its log and exits
at once. A rank that dies or stalls before writing its result fails the test within the time limit,
named, with every rank's log (each rank dumps its Python stacks there via faulthandler before a hung run
is killed).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROCESS_GROUP_TIMEOUT = 60  # seconds a collective may wait for a missing rank before raising
RUN_TIMEOUT = 240  # seconds for a whole multi-process run, start-up included
_LOG_TAIL = 3000  # characters of each rank's log quoted in a failure


class RanksFailed(AssertionError):
    """A rank died, raised, or did not finish in time; the message names it and quotes every rank's log."""


# ----- inside each spawned rank ---------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, folder: str, fn: Callable, args: tuple) -> None:
    folder = Path(folder)
    log = open(folder / f"rank{rank}.log", "w", buffering=1)
    # File descriptors 1 and 2 too, so that what gloo's C++ code prints before an abort is kept.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)  # fatal signals (SIGABRT, SIGSEGV) dump the stacks
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # the harness asks before killing
    torch.set_num_threads(1)
    status = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder / 'store'}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT),
        )
        result = fn(rank, *args)
        partial = folder / f"rank{rank}.pt.partial"
        torch.save(result, partial)
        os.replace(partial, folder / f"rank{rank}.pt")  # the result appears whole or not at all
        dist.barrier()
    except BaseException:
        traceback.print_exc(file=log)
        status = 1
    log.flush()
    os._exit(status)  # no gloo teardown (see the module docstring)


# ----- in the test process --------------------------------------------------------------------------------


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _logs(folder: Path, world_size: int) -> str:
    parts = []
    for rank in range(world_size):
        path = folder / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        parts.append(f"----- rank {rank} log (last {_LOG_TAIL} chars) -----\n{text[-_LOG_TAIL:]}")
    return "\n".join(parts)


def _stop(processes: list) -> None:
    """Ask every live rank for its Python stacks (into its log), then kill it."""
    live = [p for p in processes if p.is_alive()]
    for p in live:
        os.kill(p.pid, signal.SIGUSR1)
    if live:
        time.sleep(1.0)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join(5)


class SpawnedRanks:
    """`world_size` spawned ranks running `fn(rank, *args)` in one gloo process group (see `run_ranks`)."""

    def __init__(self, fn: Callable, world_size: int, folder: Path, *, args: tuple = ()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.world_size = world_size
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(target=_rank_main, args=(rank, world_size, str(self.folder), fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for p in self.processes:
            p.start()
        self.started = time.monotonic()

    def log(self, rank: int) -> str:
        path = self.folder / f"rank{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout: float = RUN_TIMEOUT) -> list:
        """Every rank's result. Raises `RanksFailed` as soon as a rank ends without one, or after `timeout` s."""
        results = [self.folder / f"rank{rank}.pt" for rank in range(self.world_size)]
        deadline = time.monotonic() + timeout
        while not all(path.exists() for path in results):
            failed = [r for r, p in enumerate(self.processes) if not p.is_alive() and not results[r].exists()]
            if failed:
                raise RanksFailed(
                    "; ".join(f"rank {r} ended without a result ({_describe_exit(self.processes[r].exitcode)})" for r in failed)
                    + "\n" + _logs(self.folder, self.world_size)
                )
            if time.monotonic() > deadline:
                missing = [r for r, path in enumerate(results) if not path.exists()]
                _stop(self.processes)
                raise RanksFailed(
                    f"ranks {missing} gave no result within {timeout:.0f} s (stacks dumped in their logs)\n"
                    + _logs(self.folder, self.world_size)
                )
            time.sleep(0.05)
        # Every result is written; a rank may still be at its final barrier. Its exit code does not matter.
        for p in self.processes:
            p.join(max(0.0, min(10.0, deadline - time.monotonic())))
        return [torch.load(path, weights_only=False) for path in results]

    def __enter__(self) -> "SpawnedRanks":
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.processes)


def run_ranks(fn: Callable, world_size: int, folder: Path, *, args: tuple = (), timeout: float = RUN_TIMEOUT) -> list:
    """Run `fn(rank, *args)` on `world_size` spawned ranks in one gloo process group; return their results.

    `fn` must be importable by a fresh interpreter (a module-level function). Raises `RanksFailed` as
    soon as a rank ends without a result, or when `timeout` seconds pass, after stopping the others.
    """
    with SpawnedRanks(fn, world_size, folder, args=args) as ranks:
        return ranks.wait(timeout)


class Launched:
    """A launcher command (torchrun, accelerate) running in its own session, its output going to a file.

    The session makes its whole process group — the workers it spawned included — killable at once on a
    timeout or when the test ends; a file, unlike a pipe, cannot be held open by an orphaned worker.
    """

    def __init__(self, command: list[str], folder: Path, *, env: dict | None = None, cwd=None):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.log_path = folder / "launcher.log"
        environment = {**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=environment, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """{local rank: pid} of the Python workers the launcher started so far."""
        import psutil

        pids = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                local_rank = child.environ().get("LOCAL_RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if local_rank is not None and "python" in os.path.basename(child.exe()):
                pids.setdefault(int(local_rank), child.pid)
        return pids

    def wait(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
        """Wait for the launcher; return (exit code, output). After `timeout` s, kill it all and raise."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RanksFailed(f"{' '.join(self.command[:6])} ... did not finish within {timeout:.0f} s\n{self.output()[-2 * _LOG_TAIL:]}")
        finally:
            self.kill()  # leftovers of a launcher that exited (it should not leave any)
        return self.process.returncode, self.output()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def run_launcher(command: list[str], folder: Path, *, timeout: float = RUN_TIMEOUT, env: dict | None = None, cwd=None) -> tuple[int, str]:
    """Run a launcher command to its end within `timeout` s; return (exit code, output)."""
    with Launched(command, folder, env=env, cwd=cwd) as launched:
        return launched.wait(timeout)


# How torchrun reports a worker that gloo aborted while it tore down (see the module docstring).
_TEARDOWN_ABORT = ("terminate called without an active exception", "exitcode  : -6")


def assert_launch_succeeded(code: int, output: str) -> None:
    """The launcher exited 0 — or its only failure is gloo's abort at teardown, which this accepts (with a
    warning) because it happens after every result was written; the caller still checks those results."""
    if code == 0:
        return
    # A worker's Python error would add a traceback to the one torchrun prints of itself.
    if all(sign in output for sign in _TEARDOWN_ABORT) and output.count("Traceback (most recent call last)") <= 1:
        warnings.warn(f"accepted a gloo teardown abort (exit code {code}); the results are judged from the files the ranks wrote")
        return
    raise RanksFailed(f"launcher exit code {code}\n{output[-2 * _LOG_TAIL:]}")


def torchrun(*arguments: str) -> list[str]:
    """A torchrun command line that picks its own free port (`--standalone`): no port race."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *arguments]
