"""What `chunkwise train` tells its user: options named as typed, a chunk that holds a whole sequence, a resumed run's
time over all its sessions, and the held-out accuracy on loss.png."""

from __future__ import annotations

import json
import shutil

from tokenizer_fixtures import model_dir  # noqa: F401  (a fixture)

from chunkwise.cli.main import main
from chunkwise.recipes.train import reporting

SMALL = ["--seq-len", "48", "--chunk-size", "16", "--batch-size", "2", "--no-progress"]


def test_a_missing_field_is_named_as_its_option(tmp_path, capsys, model_dir):  # noqa: F811
    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"content": "w1 w2 w3"}) + "\n")
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "has no field 'text'" in error and "set --text-field to the right field" in error and "text_field" not in error


def test_a_chunk_holding_the_whole_sequence_is_said(tmp_path, capsys):
    arguments = ["train", "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--eval-every", "0", "--no-progress"]
    assert main([*arguments, "--chunk-size", "64", "--output", str(tmp_path / "one")]) == 0
    assert "note: --chunk-size 64 >= --seq-len 32: each sequence is a single chunk" in capsys.readouterr().out
    assert main([*arguments, "--chunk-size", "16", "--output", str(tmp_path / "two")]) == 0
    assert "single chunk" not in capsys.readouterr().out


def test_a_resumed_run_counts_time_over_all_its_sessions(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                 "--output", str(run)]) == 0
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "model")
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    total = sum(r["seconds"] for r in records)  # steps 1-4 and the evaluations at steps 0, 2 and 4
    assert "done: 4 steps (steps 3-4 in this session" in out
    assert f"the run's steps and evaluations {total:.0f} s in all" in out
    assert "held-out evaluation: 3 evaluations" in out and f"of the run's {total:.1f} s of steps and evaluations" in out


def test_loss_plot_shows_held_out_accuracy_and_chance(tmp_path, monkeypatch):
    drawn = {}
    import matplotlib.figure

    def keep(figure, path, **options):
        drawn["axes"] = [(axis.get_ylabel(), [line.get_label() for line in axis.get_lines()]) for axis in figure.axes]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    records = [{"kind": "train", "step": 1, "loss": 4.0}, {"kind": "train", "step": 2, "loss": 3.0},
               {"kind": "eval", "step": 0, "loss": 4.2, "accuracy": 0.0, "chance": 0.03},
               {"kind": "eval", "step": 2, "loss": 3.1, "accuracy": 0.4, "chance": 0.03}]
    reporting.plot_losses(records, tmp_path / "loss.png", title="t")
    (_, left), (right_label, right) = drawn["axes"]
    assert "held-out loss" in left and right_label == "held-out accuracy" and right == ["held-out accuracy", "chance"]
