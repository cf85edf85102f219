"""The benchmark harness behind `chunkwise bench`: step time and peak memory of ordinary training and
of chunk-wise training, each (method, sequence length) case measured in a fresh process.

Why a fresh process per case: peak memory belongs to a process (on CPU its peak resident set, on CUDA
the caching allocator's peak), and one case's leftovers — allocator caches, fragmentation, a grown
heap — must not leak into the next. The parent (this module) builds `BenchCase`s, runs
`python -m chunkwise.tools.bench.measure --case '<json>'` for each, and collects the `CaseResult` the child
prints; what a case measures and how is in `chunkwise.tools.bench.measure`. A child killed by SIGKILL (what
the kernel's OOM killer sends) is recorded as out of memory, like an allocation error inside the child.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from chunkwise.models.presets import BENCH_MODELS
from chunkwise.tools.bench.case import RESULT_MARKER, BenchCase, BenchSettings, CaseResult
from chunkwise.tools.bench.report import BenchReport, MemorySearch
from chunkwise.utils.memory import MiB

# ----- one subprocess per case ---------------------------------------------------------------------------


def child_command(case: BenchCase) -> list[str]:
    """The command line that measures `case` in a fresh Python process."""
    return [sys.executable, "-m", "chunkwise.tools.bench.measure", "--case", json.dumps(asdict(case))]


def child_environment() -> dict[str, str]:
    """The child's environment: ours, plus glibc malloc settings that make resident memory track live
    tensors (unless the caller set them).

    By default glibc serves blocks below a threshold that grows up to 32 MiB from its heap, and keeps
    freed heap memory resident for reuse; the peak resident set then depends on fragmentation and on
    what earlier steps left behind (the quick model's full backprop at 512 tokens peaked 39% higher
    after a warmup step than without one). With a
    fixed 16 KiB threshold every tensor of 16 KiB or more gets its own mapping, returned to the system
    when freed, so the peak resident set is the peak of live memory plus a small heap — the CPU analogue
    of CUDA's max_memory_allocated. The price is page faults on fresh memory in every step, a small
    cost next to the matrix products.
    """
    return {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0", **os.environ}


def run_case(case: BenchCase, *, timeout_s: float | None = None, command: list[str] | None = None) -> CaseResult:
    """Measure `case` in a fresh subprocess (`command` replaces the child's command line, for tests).

    A child killed by SIGKILL (what Linux's OOM killer sends) is recorded as "oom"; a child that fails
    otherwise is recorded as "error" with the last line it wrote to stderr (or the signal's name).
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command or child_command(case), capture_output=True, text=True, timeout=timeout_s, env=child_environment()
        )
    except subprocess.TimeoutExpired:
        return CaseResult(case, "timeout", error=f"no result within {timeout_s:g} s", wall_s=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return CaseResult.from_dict(json.loads(line[len(RESULT_MARKER) :]))
    wall = time.perf_counter() - started
    if proc.returncode == -signal.SIGKILL:
        return CaseResult(case, "oom", error="the case's process was killed by SIGKILL (out of memory)", wall_s=wall)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode < 0:
        message = f"the case's process was killed by {signal.Signals(-proc.returncode).name}"
    else:
        message = lines[-1] if lines else f"exit status {proc.returncode} and no result"
    return CaseResult(case, "error", error=message[:500], wall_s=wall)


# ----- the benchmark: a grid of cases, and the longest sequence within a memory budget ------------------


def describe_machine(device: str) -> dict:
    """The machine the numbers come from: CPU, cores, memory, library versions, accelerator, load."""
    import transformers

    from chunkwise import __version__

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),  # cases may set their own (settings.threads)
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "chunkwise": __version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model,
    }
    try:
        with open("/proc/meminfo") as meminfo:
            machine["memory_total_bytes"] = int(next(l for l in meminfo if l.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        # Other processes on the machine slow every case down; the load average says how busy it was.
        machine["load_average_at_start"] = os.getloadavg()
    machine["chunkwise_source"] = _source_revision()
    return machine


def _source_revision() -> str | None:
    """`git describe --always --dirty` of the chunkwise checkout, so numbers can be tied to code."""
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _log_result(result: CaseResult, log: Callable[[str], None], prefix: str = "") -> None:
    case = result.case
    if result.ok:
        cpu = f" (CPU {sorted(result.step_cpu_s)[len(result.step_cpu_s) // 2]:.3f} s)" if result.step_cpu_s else ""
        detail = f"{result.time_s:.3f} s/step{cpu}, peak +{result.peak_memory_bytes / MiB:.1f} MiB"
    else:
        detail = f"{result.status.upper()}: {result.error}"
    log(f"{prefix}{case.method:>7} @ {case.seq_len:>6} tokens: {detail}")


def run_grid(settings: BenchSettings, *, log: Callable[[str], None] = print) -> list[CaseResult]:
    """Every (method, length) case, shortest lengths first. Once a method runs out of memory, its longer
    lengths are recorded as out of memory without running them (they would need more)."""
    results, oom_at = [], {}
    cases = [(length, method) for length in sorted(set(settings.lengths)) for method in settings.methods]
    for index, (length, method) in enumerate(cases, 1):
        case = settings.case(method, length)
        if method in oom_at:
            result = CaseResult(case, "oom", error=f"not run: out of memory at {oom_at[method]} tokens already")
        else:
            result = run_case(case, timeout_s=settings.timeout_s)
            if result.status == "oom":
                oom_at[method] = length
        results.append(result)
        _log_result(result, log, f"[{index}/{len(cases)}] ")
    return results


def longest_within(
    settings: BenchSettings, method: str, budget_bytes: int, *, log: Callable[[str], None] = print
) -> MemorySearch:
    """The longest sequence `method` trains with a peak of at most `budget_bytes` above the baseline.

    Doubles the length from the shortest grid length (rounded to whole chunks) until a step runs out of
    memory or exceeds the budget, then bisects between the last fit and the first miss down to one chunk.
    Each probe is one step (no warmup, one repeat) under a memory cap a little above the budget, so an
    oversized probe fails fast instead of exhausting the machine; the cap is a guard with some slack
    (address space is not resident memory), and "fits" is decided by the measured peak.
    """
    chunk = settings.chunk_size
    cap = budget_bytes + max(budget_bytes // 4, 64 * MiB)
    probes: list[CaseResult] = []

    def fits(length: int) -> bool:
        result = run_case(settings.case(method, length, warmup=0, repeats=1, memory_cap=cap), timeout_s=settings.timeout_s)
        probes.append(result)
        fit = result.ok and result.peak_memory_bytes <= budget_bytes
        # A probe that fails for another reason than memory ("error", "timeout") counts as a miss; it
        # stays in `probes` for the caller to report.
        _log_result(result, log, f"[max-memory {method}] {'fits' if fit else 'over'}: ")
        return fit

    limit = BENCH_MODELS.get(settings.model, {}).get("max_position_embeddings", 1 << 20)
    limit = min(limit, settings.max_length or limit)
    length = max(chunk, min(settings.lengths) // chunk * chunk)
    fit, miss = 0, None
    while True:  # bracket the answer: double while it fits, halve (down to one chunk) while it does not
        if fits(length):
            fit = length
            if miss is not None or length * 2 > limit:
                break
            length *= 2
        else:
            miss = length
            if fit or length == chunk:
                break
            length = max(chunk, length // 2 // chunk * chunk)
    while fit and miss is not None and miss - fit > chunk:  # bisect to one chunk
        middle = (fit + miss) // 2 // chunk * chunk
        if fits(middle):
            fit = middle
        else:
            miss = middle
    return MemorySearch(method, budget_bytes, fit, probes, at_limit=bool(fit) and miss is None)


def run_benchmark(settings: BenchSettings, *, log: Callable[[str], None] = print) -> BenchReport:
    """Run the grid and, with `max_memory`, the per-method search; return everything measured."""
    report = BenchReport(describe_machine(settings.device), settings, run_grid(settings, log=log))
    if settings.max_memory is not None:
        for method in settings.methods:
            report.searches.append(longest_within(settings, method, settings.max_memory, log=log))
    if hasattr(os, "getloadavg"):
        report.machine["load_average_at_end"] = os.getloadavg()
    return report
