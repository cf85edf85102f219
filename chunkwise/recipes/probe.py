"""`chunkwise eval --task passkey|needle`: long-context probes, prefilled chunk by chunk, answered greedily.

    chunkwise eval --model runs/demo --task passkey --seq-len 4096,16384,65536 --depths 0,0.5,1

For each length and depth, `num_probes` probes (`chunkwise.data.probes`) are read chunk by chunk through the KV cache
(`generate.greedy_generate`) and continued greedily; a probe counts as answered when the continuation
starts with the answer. The report is accuracy per length × depth, with the peak memory of each length above
the loaded model and the KV cache's share of it (so "flat" can be checked: what is not KV cache does not
grow with the length), written as a table, a heat-map PNG and JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.inference import greedy_generate
from chunkwise.data.probes import PROBE_TASKS, ProbeCell, build_probe, probe_language

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ProbeConfig:
    """Settings of `chunkwise eval --task passkey|needle` (the CLI flags map one to one)."""

    model: str
    """A run directory, a model or adapter folder, or a hub id (with its tokenizer)."""
    task: str = "passkey"
    lengths: tuple[int, ...] = (4096,)
    """Probe lengths in tokens (prompt + answer)."""
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    """Where the needle sits in the haystack: 0 = its start, 1 = its end."""
    num_probes: int = 5
    """Probes per (length, depth), each with its own answer and haystack."""
    chunk_size: int = 1024
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    allow_extrapolation: bool = False

    def check(self) -> None:
        if self.task not in PROBE_TASKS:
            raise ValueError(f"--task must be one of lm, {', '.join(PROBE_TASKS)}; got {self.task!r}")
        if not self.lengths or any(length < 2 for length in self.lengths):
            raise ValueError(f"--seq-len must be lengths of at least 2 tokens, got {self.lengths}")
        if not self.depths or any(not 0.0 <= depth <= 1.0 for depth in self.depths):
            raise ValueError(f"--depths must be fractions between 0 and 1, e.g. 0,0.5,1; got {self.depths}")
        for name in ("num_probes", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")


@dataclass
class LengthCost:
    """Memory and time of all probes of one length."""

    length: int
    peak_memory_bytes: int
    """Peak over this length's probes above the memory in use just before them (the loaded model, the
    probes' token ids; CPU: resident set, CUDA: allocated)."""
    kv_cache_bytes: int
    """The KV cache one probe of this length fills."""
    seconds: float
    memory_method: str

    @property
    def other_bytes(self) -> int:
        """Peak minus KV cache: activations of one chunk and the like; flat if the prefill is."""
        return self.peak_memory_bytes - self.kv_cache_bytes


@dataclass
class ProbeReport:
    model: str
    task: str
    language: str
    cells: list[ProbeCell]
    costs: list[LengthCost]
    settings: dict = field(default_factory=dict)

    def accuracy(self, length: int, depth: float) -> float:
        return next(c.accuracy for c in self.cells if c.length == length and c.depth == depth)

    @property
    def lengths(self) -> list[int]:
        return sorted({c.length for c in self.cells})

    @property
    def depths(self) -> list[float]:
        return sorted({c.depth for c in self.cells})

    def as_dict(self) -> dict:
        data = asdict(self)
        for cell, row in zip(self.cells, data["cells"]):
            row["accuracy"] = cell.accuracy
        for cost, row in zip(self.costs, data["costs"]):
            row["other_bytes"] = cost.other_bytes
        return data


def _memory_meter(device: torch.device):
    from chunkwise.utils.memory import CpuMemory, CudaMemory  # the benchmark's meters: a resettable peak per length

    return CudaMemory(device) if device.type == "cuda" else CpuMemory()


def run_probes(config: ProbeConfig, *, log=print) -> ProbeReport:
    """Build and answer the probes `config` asks for; see the module docstring."""
    from transformers.utils import logging as hf_logging

    from chunkwise.models.loading import check_position_limit
    from chunkwise.recipes.run import load_trained_model
    from chunkwise.utils.precision import resolve_device, training_dtypes

    config.check()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the report
    device = resolve_device(config.device)
    weights_dtype, autocast_dtype = training_dtypes(config.dtype, device)
    model, tokenizer, _ = load_trained_model(config.model, dtype=weights_dtype)
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; probes are written with the model's own tokenizer, so save one with the model")
    check_position_limit(model.config, max(config.lengths), allow=config.allow_extrapolation, option="--seq-len", log=log)
    handle = inspect_causal_lm(model.to(device).eval())
    language = probe_language(tokenizer, config.model)
    meter = _memory_meter(device)

    def answer(input_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        """The greedy continuation, decoded, and the bytes of the KV cache it filled."""
        tokens = torch.tensor([input_ids], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            generation = greedy_generate(handle, tokens, chunk_size=config.chunk_size, max_new_tokens=max_new_tokens)
        return tokenizer.decode(generation.tokens[0].tolist(), skip_special_tokens=True), generation.kv_cache_bytes

    # Prime once (lazy initialisation, thread pools) so that the baselines hold them, as `chunkwise bench` does.
    first = build_probe(tokenizer, language, task=config.task, length=min(config.lengths), depth=0.0, seed=-1)
    answer(first.input_ids[: 2 * min(config.chunk_size, 32)], 2)
    cells, costs = [], []
    for length in sorted(config.lengths):  # ascending: heap memory a shorter length leaves behind is reused, not counted twice
        # Probes are built before the baseline is read: what tokenizing the haystack leaves on the heap is
        # not the model's memory.
        probes = {depth: [build_probe(tokenizer, language, task=config.task, length=length, depth=depth, seed=config.seed * 1_000 + index)
                          for index in range(config.num_probes)] for depth in config.depths}
        baseline = meter.current()
        meter.reset_peak()
        started, kv_bytes = time.perf_counter(), 0
        for depth, probes_at_depth in probes.items():
            cell = ProbeCell(length, depth)
            for probe in probes_at_depth:
                output, kv_bytes = answer(probe.input_ids, probe.max_new_tokens)
                cell.correct += probe.is_answered_by(output)
                cell.total += 1
                cell.prompt_tokens.append(len(probe.input_ids))
                cell.outputs.append(output)
            cells.append(cell)
            log(f"{config.task} @ {length:,} tokens, depth {depth:.0%}: {cell.correct}/{cell.total}")
        costs.append(LengthCost(length, max(0, meter.peak() - baseline), kv_bytes, time.perf_counter() - started, meter.method))
    settings = {"chunk_size": config.chunk_size, "num_probes": config.num_probes, "dtype": config.dtype, "device": str(device), "seed": config.seed}
    return ProbeReport(config.model, config.task, language.name, cells, costs, settings)


def write_report(report: ProbeReport, folder: Path) -> dict[str, Path]:
    """`<task>.json` and the heat map `<task>.png` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{report.task}.json", "heat map": folder / f"{report.task}.png"}
    paths["json"].write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    plot_heat_map(report, paths["heat map"])
    return paths


def plot_heat_map(report: ProbeReport, path: Path) -> Path:
    """Accuracy per depth (rows) × length (columns), green = answered, as needle tests are usually shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = report.lengths, report.depths
    grid = [[report.accuracy(length, depth) for length in lengths] for depth in depths]
    figure, axis = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            axis.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=9)
    axis.set_xticks(range(len(lengths)), [f"{length:,}" for length in lengths])
    axis.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("needle depth")
    axis.set_title(f"{report.task}: {Path(report.model).name or report.model}", fontsize=10)
    figure.colorbar(image, ax=axis, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
