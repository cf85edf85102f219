"""`--report-to tensorboard`: the metrics.jsonl numbers also written as TensorBoard events (skipped without tensorboard)."""

import json

import pytest

from chunkwise.cli.main import main


def test_report_to_tensorboard_writes_the_metrics_as_events(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"document {i}: some text to learn.\n" * 4)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", str(docs), "--seq-len", "64", "--chunk-size", "32", "--steps", "3",
                 "--eval-fraction", "0.25", "--eval-every", "2", "--report-to", "tensorboard", "--output", str(run), "--no-progress"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "loss"), ("eval", "accuracy")):
        expected = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        got = [(event.step, event.value) for event in events.Scalars(f"{kind}/{key}")]
        assert got == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected], (kind, key)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 3]


def test_report_to_tensorboard_without_the_package_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    (tmp_path / "a.txt").write_text("text\n" * 10)
    assert main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "a.txt"), "--report-to", "tensorboard",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs the tensorboard package: pip install tensorboard" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_hides_the_events_of_the_steps_it_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chunkwise.recipes.train.reporting import MetricsLog

    first = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    for step in (1, 2, 3):
        first.append({"kind": "train", "step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tb")
    assert resumed.truncate_after(1) == 2  # the checkpoint was at step 1: steps 2 and 3 are redone
    for step in (2, 3):
        resumed.append({"kind": "train", "step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
