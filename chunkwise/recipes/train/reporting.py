"""What a training run shows and leaves behind: progress line, `metrics.jsonl` (and, with `--report-to
tensorboard`, the same numbers as TensorBoard events), loss curve PNG.

Kept apart from the training loop so the loop reads as the algorithm's caller and nothing else.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from chunkwise.utils.memory import format_bytes

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, `{"kind": "train" | "eval", "step": ..., ...}`; each record also
    goes to TensorBoard when `tensorboard` names the folder for its events."""

    def __init__(self, path: Path, *, tensorboard: Path | None = None):
        self.path = Path(path)
        self.board = TensorBoardLog(tensorboard) if tensorboard is not None else None

    def append(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.append(record)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after `step` (a resumed run redoes them); return how many were dropped."""
        records = self.records()
        kept = [record for record in records if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        if self.board is not None:
            self.board.purge_after(step)
        return len(records) - len(kept)


def require_tensorboard():
    """torch's `SummaryWriter` class; ValueError with the install command when the tensorboard package is missing
    (checked before anything loads, so a run does not fail after minutes of loading)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package, which is optional
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or drop --report-to; metrics.jsonl has the same numbers)") from None
    return SummaryWriter


class TensorBoardLog:
    """`--report-to tensorboard`: every number of a metrics record as a scalar, `train/loss`, `eval/accuracy`, ..."""

    def __init__(self, folder: Path):
        self.writer_class, self.folder = require_tensorboard(), folder
        self.writer = None  # opened at the first record, so that a resumed run can first say what to purge
        self.purge_step = None

    def purge_after(self, step: int) -> None:
        """A resumed run redoes the steps after `step`: TensorBoard hides the earlier session's events from step + 1 on."""
        self.purge_step = step + 1

    def append(self, record: dict) -> None:
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=self.purge_step)
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        self.writer.flush()  # a step takes seconds: flushing each record keeps the events current if the run dies

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(records: list[dict], path: Path, *, title: str) -> Path | None:
    """Training loss per step (raw and smoothed), any held-out loss points (the best starred) and, on a second axis,
    the held-out accuracy (with chance, where the task has one); returns the PNG path."""
    train = [r for r in records if r["kind"] == "train" and r.get("loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        # Trailing mean over up to `window` steps, from running sums.
        sums = [0.0, *itertools.accumulate(losses)]
        smoothed = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"train loss ({window}-step mean)")
    evals = [r for r in records if r["kind"] == "eval"]
    if evals:
        axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", color="tab:orange", label="held-out loss")
        best = min(evals, key=lambda r: (r["loss"], r["step"]))
        axis.plot([best["step"]], [best["loss"]], "*", color="tab:red", markersize=14, label=f"best: step {best['step']}")
        _plot_accuracy(axis, evals)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats / target token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    handles, labels = [], []
    for each in figure.axes:  # one legend for both axes
        more = each.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axis.legend(handles, labels)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_accuracy(axis, evals: list[dict]) -> None:
    """Held-out next-token (or task) accuracy on a right-hand axis: what the demo's task is about."""
    scored = [r for r in evals if r.get("accuracy") is not None]
    if not scored:
        return
    right = axis.twinx()
    right.plot([r["step"] for r in scored], [r["accuracy"] for r in scored], "s--", color="tab:green", label="held-out accuracy")
    if scored[-1].get("chance") is not None:
        right.axhline(scored[-1]["chance"], color="tab:green", linestyle=":", alpha=0.6, label="chance")
    right.set_ylabel("held-out accuracy")
    right.set_ylim(0, 1)


class TrainingProgress:
    """A live progress bar on a terminal; one plain line every `log_every` steps otherwise (logs, CI)."""

    def __init__(self, *, total_steps: int, start_step: int, log_every: int, enabled: bool = True):
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.log_every, self.total, self.enabled = log_every, total_steps, enabled
        self.bar = None
        self.last_held_out = ""
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()

    def held_out(self, record: dict | None) -> None:
        """Show the latest held-out loss on the progress line from now on (None: no evaluation was made)."""
        if record is not None:
            self.last_held_out = f"  held-out {record['loss']:.4f} @ {record['step']}"

    def step(self, record: dict) -> None:
        loss = "skipped (non-finite)" if record.get("skipped") else f"loss {record['loss']:.4f}"
        status = f"{loss}  {record['tokens_per_s']:,.0f} tok/s  peak {format_bytes(record['peak_memory_bytes'])}{self.last_held_out}"
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], status=status)
        elif self.enabled and (record["step"] % self.log_every == 0 or record["step"] == self.total):
            print(f"step {record['step']:>6}/{self.total}  {status}", file=sys.stderr, flush=True)

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)
