"""`chunkwise train --resume`: a run is identified by itself, not by how its folder is spelled or where it lies.

A run cut back to its step-2 checkpoint (an interruption, as far as resuming can tell) is resumed copied, moved,
and through a relative path with its data named another way; each continues bit for bit as the straight run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizer_fixtures import model_dir, random_text  # noqa: F401  (model_dir is a fixture)

from chunkwise.cli.main import main
from chunkwise.recipes.run import RUN_FILE

SMALL = ["--seq-len", "48", "--chunk-size", "16", "--batch-size", "2", "--steps", "4", "--eval-every", "0", "--no-progress",
         "--checkpoint-every", "2", "--keep-checkpoints", "2", "--lora-r", "0"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def cut_back_to_step_2(run: Path, copy: Path) -> Path:
    """A copy of finished `run` as an interrupted run would leave it: its step-2 checkpoint is the latest."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    shutil.rmtree(copy / "model")
    return copy


def assert_same_run(resumed: Path, straight: Path) -> None:
    assert losses(resumed) == losses(straight)  # bit for bit, steps 1-2 kept and 3-4 redone
    reference = final_weights(straight)
    for name, tensor in final_weights(resumed).items():
        assert torch.equal(tensor, reference[name]), name


def test_copied_moved_and_relative_runs_resume_bit_identically(tmp_path, monkeypatch, capsys, model_dir):
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(random_text(random.Random(0), 400))
    model = ["--model", str(model_dir), "--data", str(corpus)]
    straight = tmp_path / "straight"
    assert main(["train", *SMALL, *model, "--output", str(straight)]) == 0
    assert json.loads((straight / RUN_FILE).read_text())["run_id"]

    copied = cut_back_to_step_2(straight, tmp_path / "copied")  # absolute path, another folder than the run was made in
    assert main(["train", "--output", str(copied), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(copied, straight)

    # Moved, then resumed from another working directory through a relative path, the data named relatively too.
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(cut_back_to_step_2(straight, tmp_path / "to-move"), moved)
    monkeypatch.chdir(tmp_path / "data")
    assert main(["train", "--output", "../elsewhere/moved", "--resume", "--data", "corpus.txt"]) == 0
    assert_same_run(moved, straight)


def test_steps_changed_on_resume_is_refused_and_the_run_kept(tmp_path, capsys):
    run = tmp_path / "run"
    demo = [*SMALL[:-2], "--output", str(run)]  # the demo model from scratch, synthetic data
    assert main(["train", *demo]) == 0
    cut = cut_back_to_step_2(run, tmp_path / "cut")
    before = (cut / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--output", str(cut), "--resume", "--steps", "8"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("chunkwise train: error: --resume --steps 8:") and "started with --steps 4" in error
    assert "\n" not in error
    assert (cut / "metrics.jsonl").read_text() == before  # nothing redone, nothing lost
    assert main(["train", "--output", str(cut), "--resume", "--steps", "4"]) == 0  # the same number is no change
    assert_same_run(cut, run)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL[:-2], "--output", str(run)]) == 0
    cut = cut_back_to_step_2(run, tmp_path / "cut")
    record = json.loads((cut / RUN_FILE).read_text())
    record["run_id"] = "0" * 32  # as if the checkpoints had been copied in from another run
    (cut / RUN_FILE).write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["train", "--output", str(cut), "--resume"]) == 2
    assert "belongs to another run" in capsys.readouterr().err
