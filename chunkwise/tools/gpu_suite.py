"""The one-shot GPU suite: everything docs/benchmarks.md asks of a GPU, measured in one run of <= 8 minutes.

    PYTHONPATH=. python -m chunkwise.cli bench --suite gpu --output $OUT/gpu

Made for a machine lent for minutes, whose Python has torch, transformers, peft and accelerate but
where nothing can be installed: it runs from the source tree, needs nothing else (no matplotlib, no
rich), and uses no transformers API newer than 5.17. It writes `suite.json` and `suite.md` to the
output folder after every case, so a run cut short keeps what it measured.

Cases, in order (each in a child process with a time cap; out of memory is a result):

1. `attention` — the engine's split attention through each fused kernel (cuda-flash, cuda-efficient,
   cuda-cudnn), the blocked plain-ops kernel, and SDPA (KV repeated to the query heads, lower-right
   causal mask: its flash kernel), bf16 and fp32: error of output and q/k/v gradients against float64
   math attention on a small problem, and forward+backward time on Llama-3.2-1B chunk shapes (32 query
   heads over 8 KV heads, head dim 64, chunk 2048 over a past of 0, 8K and 30K keys). Also which kernel
   the first-use self-check picked.
2. `gradient` — a Llama-3.2-1B-shaped model (random init from the config) at 4K tokens, chunk 1024:
   SeCO's and full backprop's gradient error against a float32 full-backprop reference, for bf16
   weights and for float32 weights under bf16 autocast (the bf16 KV cache); and whether SeCO with the
   KV cache offloaded gives the same bits as without.
3. `speed` — step time and peak memory (`max_memory_allocated` above the loaded model) of full, ckpt,
   seco, spaco (budget 8) and seco+offload at 4K, 16K and 64K, then seco and seco+offload at 128K and
   256K as the time allows (1B shape, bf16 weights, batch 1, chunk 2048).
4. `lora-8b` — a Llama-3.1-8B-shaped model with a rank-16 LoRA on q/v: one SeCO step at 16K, 32K, 64K,
   ... until the time is up; the longest one that finished is the result.

`--dry-run` runs the same code on CPU with a ~1M-parameter model and short sequences in well under a
minute (the test suite does, so the suite cannot rot unnoticed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chunkwise.tools.bench.case import RESULT_MARKER, BenchCase
from chunkwise.tools.bench.runner import child_environment, describe_machine
from chunkwise.tools.gpu_jobs import child_main, not_run, note
from chunkwise.utils.memory import MiB

SUITE_SECONDS = 450  # the jobs, model building and process starts included; the parent's own start-up comes on top (~10 s)


@dataclass(frozen=True)
class SuitePlan:
    """What one run measures (`full_plan` on a GPU, `dry_plan` on CPU)."""

    device: str
    model: str
    big_model: str
    dtype: str
    attention_shape: dict  # heads, kv_heads, head_dim, chunk, pasts
    attention_dtypes: tuple[str, ...]
    check_shape: dict  # the small problem the errors are measured on
    gradient_length: int
    gradient_chunk: int
    speed_lengths: tuple[int, ...]
    speed_methods: tuple[str, ...]
    long_lengths: tuple[int, ...]
    chunk_size: int
    big_lengths: tuple[int, ...]
    big_chunk: int
    lora_r: int
    budget_s: float
    caps_s: dict  # case name -> seconds
    reserve_big_s: float  # seconds kept for the 8B case while the speed cases run
    timing_repeats: int = 5


def full_plan(device: str = "cuda", budget_s: float = SUITE_SECONDS) -> SuitePlan:
    return SuitePlan(
        device=device, model="llama-1b", big_model="llama-8b", dtype="bfloat16",
        attention_shape=dict(heads=32, kv_heads=8, head_dim=64, chunk=2048, pasts=(0, 8192, 30720)),
        attention_dtypes=("bfloat16", "float32"),
        check_shape=dict(heads=32, kv_heads=8, head_dim=64, chunk=256, past=1000),
        gradient_length=4096, gradient_chunk=1024,
        speed_lengths=(4096, 16384, 65536), speed_methods=("full", "ckpt", "seco", "spaco", "seco+offload"),
        long_lengths=(131072, 262144), chunk_size=2048,
        big_lengths=(16384, 32768, 65536, 131072, 262144), big_chunk=4096, lora_r=16,
        budget_s=budget_s,
        caps_s={"attention": 60, "gradient": 90, 4096: 45, 16384: 45, 65536: 60, 131072: 90, 262144: 150, "lora-8b": 240},
        reserve_big_s=100,
    )


def dry_plan(budget_s: float = 120) -> SuitePlan:
    return SuitePlan(
        device="cpu", model="quick", big_model="quick", dtype="float32",
        attention_shape=dict(heads=4, kv_heads=2, head_dim=16, chunk=32, pasts=(0, 96)),
        attention_dtypes=("bfloat16", "float32"),
        check_shape=dict(heads=4, kv_heads=2, head_dim=16, chunk=16, past=40),
        gradient_length=96, gradient_chunk=32,
        speed_lengths=(64,), speed_methods=("full", "ckpt", "seco", "spaco", "seco+offload"),
        long_lengths=(128,), chunk_size=16,
        big_lengths=(64, 128), big_chunk=32, lora_r=4,
        budget_s=budget_s,
        caps_s={"attention": 60, "gradient": 60, 64: 30, 128: 30, 256: 30, "lora-8b": 60},
        reserve_big_s=15, timing_repeats=2,
    )


# ----- the parent: children with time caps, results written case by case ---------------------------------


@dataclass
class SuiteReport:
    """Everything one suite run measured so far."""

    plan: SuitePlan
    machine: dict
    started: float = field(default_factory=time.time)
    sections: dict = field(default_factory=dict)  # kind -> list of result dicts

    def add(self, kind: str, result: dict, directory: Path) -> None:
        self.sections.setdefault(kind, []).append(result)
        self.write(directory)

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {"machine": self.machine, "plan": asdict(self.plan), "elapsed_s": time.time() - self.started,
                "sections": self.sections, "targets": targets(self)}
        (directory / "suite.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (directory / "suite.md").write_text(markdown(self))


class Child:
    """A `python -m chunkwise.tools.gpu_suite --child` process running jobs in order; its results are read as they come."""

    def __init__(self, jobs: list[dict], failed: dict):
        env = child_environment()
        source = str(Path(__file__).resolve().parents[1])  # runs from the source tree, installed or not
        env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chunkwise.tools.gpu_suite", "--child", json.dumps({"jobs": jobs, "failed": failed})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()

    def _read(self, stream, results: bool) -> None:
        for line in stream:
            if not results:
                if line.strip():
                    self.errors = (self.errors + [line.rstrip()])[-20:]
            elif line.startswith(RESULT_MARKER):
                self.lines.put(json.loads(line[len(RESULT_MARKER):]))
        if results:
            self.lines.put(None)  # end of output

    def next_result(self, timeout_s: float) -> dict | None:
        """The next job's result; a "timeout" result after `timeout_s`, or how the child died."""
        try:
            item = self.lines.get(timeout=max(0.1, timeout_s))
        except queue.Empty:
            return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
        if item is not None:
            return item
        code = self.proc.wait()
        if code == -signal.SIGKILL:
            return {"status": "oom", "error": "the child process was killed by SIGKILL (out of memory)"}
        return {"status": "error", "error": (self.errors[-1] if self.errors else f"exit status {code} and no result")[:500]}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_jobs(jobs: list[dict], left):
    """Yield `(job, result)` for every job, in order, running them in one child process while they go
    well. A job gets `min(job["cap_s"], left() - job["reserve_s"])` seconds; over that it is recorded
    as "timeout", the child is killed and the rest go on in a new one. A job with under 5 seconds is
    "skipped"; one whose label already failed at a shorter length is not run (`_not_run`)."""
    index, failed, child = 0, {}, None
    try:
        while index < len(jobs):
            job = jobs[index]
            cap = min(job["cap_s"], left() - job["reserve_s"])
            result = None
            if not_run(job, failed) is None and cap < 5:
                result = {"status": "skipped", "error": "not run: no time left in the suite's budget"}
                if child is not None:  # it is running this job already: stop it
                    child.kill()
                    child = None
            elif child is None:
                result = not_run(job, failed)  # (a running child says the same, in its turn)
                if result is None:
                    child = Child(jobs[index:], failed)
            if result is None:
                result = child.next_result(cap)
                if "job" not in result:  # it died, or is stuck in this job: the rest go on in a new child
                    child.kill()
                    child = None
            result = {"job": job, **{k: v for k, v in result.items() if k != "job"}}
            note(job, result, failed)
            yield job, result
            index += 1
    finally:
        if child is not None:
            child.kill()


def run_suite(plan: SuitePlan, output: Path, *, log=print) -> SuiteReport:
    """Run every case of `plan` within `plan.budget_s`; write suite.json/suite.md to `output` as it goes."""
    deadline = time.monotonic() + plan.budget_s
    report = SuiteReport(plan, describe_machine(plan.device))
    report.write(output)
    for job, result in run_jobs(plan_jobs(plan), lambda: deadline - time.monotonic()):
        report.add(job["section"], result, output)
        log(_summary(result))
    return report


def plan_jobs(plan: SuitePlan) -> list[dict]:
    """The suite's jobs in order; all but the 8B ones keep `reserve_big_s` for those."""
    reserve = plan.reserve_big_s
    jobs = [
        {"kind": "attention", "section": "attention", "label": "attention", "cap_s": plan.caps_s["attention"], "reserve_s": reserve, **_attention_params(plan)},
        {"kind": "gradient", "section": "gradient", "label": "gradient", "cap_s": plan.caps_s["gradient"], "reserve_s": reserve, **_gradient_params(plan)},
    ]
    for length in plan.speed_lengths:
        jobs += [{"kind": "speed", "section": "speed", "cap_s": plan.caps_s[length], "reserve_s": reserve, **c}
                 for c in _speed_cases(plan, length, plan.speed_methods)]
    for length in plan.long_lengths:
        jobs += [{"kind": "speed", "section": "speed", "cap_s": plan.caps_s[length], "reserve_s": reserve, **c}
                 for c in _speed_cases(plan, length, ("seco", "seco+offload"))]
    jobs += [{"kind": "speed", "section": "lora-8b", "cap_s": plan.caps_s["lora-8b"], "reserve_s": 0, **_big_case(plan, length)}
             for length in plan.big_lengths]
    return jobs


def _summary(result: dict) -> str:
    job = result["job"]
    if result["status"] != "ok":
        return f"[{job['kind']}] {job['label']}: {result['status'].upper()} {result.get('error', '')}"
    if "result" in result:
        r = result["result"]
        return f"[speed] {job['label']} @ {r['case']['seq_len']}: {r['time_s']:.2f} s/step, peak +{r['peak_memory_bytes'] / MiB:.0f} MiB"
    return f"[{job['kind']}] done in {result.get('wall_s', 0):.1f} s"


# ----- case parameters ---------------------------------------------------------------------------------


def _attention_params(plan: SuitePlan) -> dict:
    return {"device": plan.device, "shape": plan.attention_shape, "check": plan.check_shape,
            "dtypes": list(plan.attention_dtypes), "repeats": plan.timing_repeats}


def _gradient_params(plan: SuitePlan) -> dict:
    return {"device": plan.device, "model": plan.model, "seq_len": plan.gradient_length,
            "chunk_size": plan.gradient_chunk}


def _speed_cases(plan: SuitePlan, length: int, methods) -> list[dict]:
    cases = []
    for label in methods:
        method, offload = (label.removesuffix("+offload"), label.endswith("+offload"))
        short = length <= 16384 or plan.device == "cpu"
        case = BenchCase(
            method=method, seq_len=length, model=plan.model, chunk_size=plan.chunk_size, budget=8, dtype=plan.dtype,
            device=plan.device, offload_kv=offload, repeats=2 if short else 1, warmup=1 if length <= 65536 else 0,
            threads=1 if plan.device == "cpu" else None,
        )
        cases.append({"label": label, "case": asdict(case)})
    return cases


def _big_case(plan: SuitePlan, length: int) -> dict:
    case = BenchCase(
        method="seco", seq_len=length, model=plan.big_model, chunk_size=plan.big_chunk, dtype=plan.dtype,
        device=plan.device, lora_r=plan.lora_r, repeats=1, warmup=0, threads=1 if plan.device == "cpu" else None,
    )
    return {"label": f"seco lora-{plan.lora_r}", "case": asdict(case)}


# ----- the report -------------------------------------------------------------------------------------


def _speed(report: SuiteReport, label: str, length: int, kind: str = "speed") -> dict | None:
    for r in report.sections.get(kind, []):
        if r["job"]["label"] == label and r["job"]["case"]["seq_len"] == length:
            return r["result"] if r["status"] == "ok" else None
    return None


def targets(report: SuiteReport) -> list[dict]:
    """The issue's targets, each with the measured value (None where the suite did not get there)."""
    plan = report.plan
    rows = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    def time_of(label, length):
        r = _speed(report, label, length)
        return r["time_s"] if r else None

    def memory_of(label, length):
        r = _speed(report, label, length)
        return r["peak_memory_bytes"] if r else None

    fits = [n for n in plan.speed_lengths if time_of("full", n) is not None]
    worst = max((ratio(time_of("seco", n), time_of("full", n)) or 0 for n in fits), default=None)
    rows.append({"target": "SeCO step time <= 1.3x full backprop where full fits", "bound": 1.3,
                 "value": worst or None, "detail": f"worst over {fits}"})
    attention = next(iter(report.sections.get("attention", [])), None)
    engine_vs_sdpa = None
    if attention and attention["status"] == "ok":
        pairs = [(r["times_s"].get("engine"), r["times_s"].get("sdpa")) for r in attention["rows"]
                 if r.get("dtype") == "bfloat16" and "times_s" in r]
        speeds = [s / e for e, s in pairs if isinstance(e, float) and isinstance(s, float)]
        engine_vs_sdpa = min(speeds) if speeds else None
    rows.append({"target": "engine attention >= 0.9x SDPA's speed (bf16, same chunk shapes)", "bound": 0.9,
                 "value": engine_vs_sdpa, "detail": "slowest over the pasts measured", "higher_is_better": True})
    length = 16384 if 16384 in plan.speed_lengths else plan.speed_lengths[-1]
    rows.append({"target": f"peak memory at {length}: SeCO <= 1/8 of full", "bound": 0.125,
                 "value": ratio(memory_of("seco", length), memory_of("full", length)), "detail": "seco / full"})
    offload = [(n, memory_of("seco+offload", n)) for n in plan.speed_lengths + plan.long_lengths]
    offload = [(n, m) for n, m in offload if m is not None]
    growth = None
    if len(offload) >= 2:
        (n0, m0), (n1, m1) = offload[0], offload[-1]
        growth = (m1 - m0) / ((n1 - n0) / 1024) / 1e6
    rows.append({"target": "offload: device memory growth <= 1 MB per 1K tokens", "bound": 1.0, "value": growth,
                 "detail": f"between {offload[0][0]} and {offload[-1][0]} tokens" if len(offload) >= 2 else ""})
    longest = {label: max((n for n in plan.speed_lengths + plan.long_lengths if _speed(report, label, n)), default=None)
               for label in ("full", "seco", "seco+offload")}
    reach = ratio(max(filter(None, [longest["seco"], longest["seco+offload"]]), default=None), longest["full"])
    rows.append({"target": "longest trainable length >= 16x full's", "bound": 16, "value": reach, "higher_is_better": True,
                 "detail": f"longest run: {longest} (same device memory; a lower bound where seco was not stopped by memory)"})
    long = 65536 if 65536 in plan.speed_lengths else plan.speed_lengths[-1]
    cost = ratio(time_of("seco+offload", long), time_of("seco", long))
    rows.append({"target": f"offload costs <= 15% step time at {long}", "bound": 1.15, "value": cost,
                 "detail": "seco+offload / seco"})
    for row in rows:
        value, bound = row["value"], row["bound"]
        row["met"] = None if value is None else (value >= bound if row.get("higher_is_better") else value <= bound)
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: SuiteReport) -> str:
    m = report.machine
    lines = [
        f"# chunkwise GPU suite{' (dry run on CPU)' if report.plan.device == 'cpu' else ''}",
        "",
        f"{m.get('device_name')} · torch {m.get('torch')} · transformers {m.get('transformers')} · "
        f"chunkwise {m.get('chunkwise_source') or m.get('chunkwise')} · {time.time() - report.started:.0f} s so far",
        "",
        "## Targets",
        "",
        "| target | measured | met | how |",
        "|---|---:|---|---|",
    ]
    for row in targets(report):
        met = {None: "not measured", True: "yes", False: "no"}[row["met"]]
        lines.append(f"| {row['target']} | {_fmt(row['value'])} | {met} | {row['detail']} |")
    for result in report.sections.get("attention", []):
        lines += ["", "## Attention: error against float64 math attention, and forward+backward time", ""]
        if result["status"] != "ok":
            lines.append(f"{result['status'].upper()}: {result.get('error')}")
            continue
        lines.append(f"Kernel choices (first-use self-check): `{json.dumps(result.get('kernel_choices'), default=str)}`")
        for row in result["rows"]:
            if "errors" in row:
                lines += ["", f"Errors, {row['dtype']} (max |x - ref| / max |ref| over output and q/k/v gradients):", "",
                          "| kernel | error |", "|---|---:|"]
                lines += [f"| {name} | {_fmt(value)} |" for name, value in row["errors"].items()]
        timed = [r for r in result["rows"] if "times_s" in r]
        if timed:
            names = list(timed[0]["times_s"])
            lines += ["", "Forward+backward time (ms) of one chunk over its past:", "",
                      "| dtype | past | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
            for r in timed:
                cells = [f"{v * 1e3:.2f}" if isinstance(v, float) else _fmt(v) for v in r["times_s"].values()]
                lines.append(f"| {r['dtype']} | {r['past']} | " + " | ".join(cells) + " |")
    for result in report.sections.get("gradient", []):
        lines += ["", "## Gradient: error against float32 full backprop", ""]
        if result["status"] != "ok":
            lines.append(f"{result['status'].upper()}: {result.get('error')}")
            continue
        p = result["job"]
        lines += [f"Model `{p['model']}`, {p['seq_len']} tokens, chunk {p['chunk_size']}.", "",
                  "| setting | full | seco | seco+offload | seco / full | offload same bits |", "|---|---:|---:|---:|---:|---|"]
        for row in result["rows"]:
            e = row["errors"]
            lines.append(f"| {row['setting']} | {_fmt(e['full'])} | {_fmt(e['seco'])} | {_fmt(e['seco+offload'])} "
                         f"| {_fmt(row['seco_over_full'])} | {row['offload_bit_identical']} |")
    for kind, title in (("speed", "Speed and peak memory"), ("lora-8b", "8B-shaped LoRA SeCO step")):
        results = report.sections.get(kind, [])
        if not results:
            continue
        lines += ["", f"## {title}", "", "| method | length | step time (s) | peak memory (MiB) | × full time | × full memory | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in results:
            length = r["job"]["case"]["seq_len"]
            label = r["job"]["label"]
            if r["status"] == "ok":
                res = r["result"]
                full = _speed(report, "full", length) if kind == "speed" else None
                lines.append(
                    f"| {label} | {length} | {res['time_s']:.3f} | {res['peak_memory_bytes'] / MiB:.0f} "
                    f"| {_fmt(res['time_s'] / full['time_s'] if full else None)} "
                    f"| {_fmt(res['peak_memory_bytes'] / full['peak_memory_bytes'] if full and full['peak_memory_bytes'] else None)} "
                    f"| {len(res['step_times_s'])} step(s) after {res['case']['warmup']} warmup |"
                )
            else:
                lines.append(f"| {label} | {length} | {r['status'].upper()} | – | – | – | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chunkwise.tools.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu-suite", help="folder for suite.json and suite.md")
    parser.add_argument("--dry-run", action="store_true", help="the same cases on CPU with a tiny model (a smoke test)")
    parser.add_argument("--budget-s", type=float, default=None, help=f"seconds for the whole run (default {SUITE_SECONDS}; dry run 120)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    return run(output=args.output, dry_run=args.dry_run, budget_s=args.budget_s)


def run(*, output: str, dry_run: bool = False, budget_s: float | None = None, device: str | None = None) -> int:
    """`chunkwise bench --suite gpu`: returns 0 when every case ran, ran out of memory or out of time."""
    if dry_run:
        plan = dry_plan(**({"budget_s": budget_s} if budget_s else {}))
    else:
        device = device or "cuda"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("the GPU suite needs a CUDA device (none is visible); use --dry-run to try it on CPU")
        plan = full_plan(device, budget_s or SUITE_SECONDS)
    report = run_suite(plan, Path(output), log=lambda line: print(line, file=sys.stderr, flush=True))
    print((Path(output) / "suite.md").read_text(), end="")
    failed = [r for results in report.sections.values() for r in results if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
