"""What one `chunkwise bench` run measured (`BenchReport`), and its outputs: bench.md, bench.json, bench.png."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chunkwise.tools.bench.case import CHUNKED, BenchSettings, CaseResult
from chunkwise.utils.memory import MiB


@dataclass
class MemorySearch:
    """The longest sequence one method trains within a memory budget.

    Attributes:
        method: the method.
        budget_bytes: the budget, bytes above the baseline.
        longest: the longest length that fit (a multiple of the chunk size), or 0 if none did.
        probes: every length tried, in order, with its result.
        at_limit: the search stopped at the length limit while still fitting: the true answer is longer.
    """

    method: str
    budget_bytes: int
    longest: int
    probes: list[CaseResult]
    at_limit: bool = False


@dataclass
class BenchReport:
    """Everything one `chunkwise bench` run measured, with the machine it ran on."""

    machine: dict
    settings: BenchSettings
    results: list[CaseResult]
    searches: list[MemorySearch] = field(default_factory=list)

    def result(self, method: str, seq_len: int) -> CaseResult | None:
        return next((r for r in self.results if r.case.method == method and r.case.seq_len == seq_len), None)

    @property
    def model_info(self) -> dict:
        probes = [p for s in self.searches for p in s.probes]
        return next((r.model_info for r in self.results + probes if r.model_info), {})

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": asdict(self.settings),
            "model": self.model_info,
            "results": [r.to_dict() for r in self.results],
            "max_memory": [
                {
                    "method": s.method,
                    "budget_bytes": s.budget_bytes,
                    "longest": s.longest,
                    "at_limit": s.at_limit,
                    "probes": [p.to_dict() for p in s.probes],
                }
                for s in self.searches
            ],
        }


# ----- outputs: Markdown table, JSON, plot --------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "–"


def _describe_documents(documents: tuple[int, ...] | None) -> str:
    if documents is None:
        return ""
    return (f" Packed row: {len(documents)} documents of {', '.join(map(str, documents))} tokens, position_ids restarting "
            "at each (per-document attention).")


def markdown_table(report: BenchReport) -> str:
    """Method × length: step time, peak memory above the baseline, and both as ratios to `full`."""
    s = report.settings
    info = report.model_info
    lines = [
        f"Model `{s.model}` ({info.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"{info.get('trainable_parameters', 0) / 1e6:.1f}M trainable), {s.dtype} on {report.machine['device_name']}; "
        f"batch {s.batch_size}, chunk size {s.chunk_size}, SpaCO budget {s.budget} (uniform), "
        f"{s.attention} attention in the engines{', KV offloaded to the host' if s.offload_kv else ''}; "
        f"median of {s.repeats} step(s) after {s.warmup} warmup step(s).{_describe_documents(s.documents)}",
        "",
        "| method | length | chunks | step time (s) | time × full | peak memory (MiB) | memory × full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for length in sorted(set(s.lengths)):
        full = report.result("full", length)
        full_time = full.time_s if full and full.ok else None
        full_memory = full.peak_memory_bytes if full and full.ok else None
        for method in s.methods:
            r = report.result(method, length)
            if r is None:
                continue
            chunks = str(r.num_chunks) if method in CHUNKED else "–"
            if method.startswith("spaco") and r.backprop_chunks is not None:
                chunks = f"{r.backprop_chunks}/{r.num_chunks}"
            if r.ok:
                memory = r.peak_memory_bytes / MiB
                lines.append(
                    f"| {method} | {length} | {chunks} | {r.time_s:.3f} | {_ratio(r.time_s, full_time)} "
                    f"| {memory:.1f} | {_ratio(r.peak_memory_bytes, full_memory)} |"
                )
            else:
                lines.append(f"| {method} | {length} | {chunks} | {r.status.upper()} | – | {r.status.upper()} | – |")
    if report.searches:
        budget = report.searches[0].budget_bytes
        full = next((x.longest for x in report.searches if x.method == "full"), None)
        lines += [
            "",
            f"Longest sequence within {budget / MiB:.0f} MiB above the baseline (to {s.chunk_size}-token granularity):",
            "",
            "| method | longest length | × full | probes |",
            "|---|---:|---:|---:|",
        ]
        for search in report.searches:
            longest = str(search.longest) if search.longest else f"< {s.chunk_size}"
            if search.at_limit:
                longest = f"≥ {search.longest} (search limit)"
            lines.append(f"| {search.method} | {longest} | {_ratio(search.longest, full)} | {len(search.probes)} |")
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """Peak memory and step time against sequence length, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in report.settings.methods:
        points = [r for r in report.results if r.case.method == method and r.ok]
        points.sort(key=lambda r: r.case.seq_len)
        if not points:
            continue
        lengths = [r.case.seq_len for r in points]
        memory_axis.plot(lengths, [r.peak_memory_bytes / MiB for r in points], marker="o", label=method)
        time_axis.plot(lengths, [r.time_s for r in points], marker="o", label=method)
    lengths = sorted(set(report.settings.lengths))
    for axis, label in ((memory_axis, "peak memory above baseline (MiB)"), (time_axis, "step time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    s = report.settings
    figure.suptitle(f"{s.model}, {s.dtype}, {report.machine['device_name']}, chunk {s.chunk_size}, SpaCO budget {s.budget}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(report: BenchReport, directory: Path) -> dict[str, Path]:
    """Write `bench.md`, `bench.json` and `bench.png` into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"table": directory / "bench.md", "json": directory / "bench.json", "plot": directory / "bench.png"}
    paths["table"].write_text(markdown_table(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot(report, paths["plot"])
    return paths
