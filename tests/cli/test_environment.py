"""The process a command runs in: the libraries' chatter off the screen unless --debug, --threads, the thread hint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from chunkwise.cli import environment
from chunkwise.cli.main import main
from chunkwise.models.presets import build_tiny_model

# What the libraries print on their own in a plain CPU run (each needs its library installed to appear at all).
NOISE = ("Loading weights", "Failed to load", "_pytree", "Setting accelerator", "kernels-community")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny_model("tiny-llama").save_pretrained(folder)  # loading it shows transformers' "Loading weights" bar
    return folder


def train_in_a_fresh_process(model_folder, output, *flags) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "chunkwise", *flags, "train", "--model", str(model_folder), "--steps", "1", "--seq-len", "32",
               "--chunk-size", "16", "--batch-size", "1", "--no-progress", "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_run_shows_only_its_own_lines_and_debug_shows_the_libraries(model_folder, tmp_path):
    quiet = train_in_a_fresh_process(model_folder, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert not [word for word in NOISE if word in quiet.stdout + quiet.stderr], quiet.stderr
    debug = train_in_a_fresh_process(model_folder, tmp_path / "debug", "--debug")
    assert debug.returncode == 0, debug.stderr
    assert "Loading weights" in debug.stderr  # transformers' own bar, left on under --debug


def test_threads_option_sets_torchs_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["verify", "--threads", "2", "--seq-len", "16", "--chunk-size", "4"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_a_hint_when_torch_runs_more_threads_than_there_are_free_cores(monkeypatch):
    monkeypatch.setattr(environment, "free_cores", lambda: (2, 1, 1.3))
    hint = environment.thread_hint(2, cuda=False, given=False)
    assert hint.startswith("note: torch runs 2 CPU threads, but only about 1 of this machine's 2 cores are free (load 1.3)")
    assert "--threads 1" in hint and "\n" not in hint
    assert environment.thread_hint(2, cuda=False, given=True) is None  # the user chose
    assert environment.thread_hint(2, cuda=True, given=False) is None  # the GPU does the work
    assert environment.thread_hint(1, cuda=False, given=False) is None
    monkeypatch.setattr(environment, "free_cores", lambda: (8, 4, 3.8))
    assert environment.thread_hint(4, cuda=False, given=False) is None


def test_the_hint_waits_for_the_run_so_that_a_late_error_stays_one_line(monkeypatch, capsys, tmp_path):
    """On a busy CPU the hint is due, but a setting refused after torch loads (here a length above the model's
    position limit) is still the only line; a command that runs prints the hint once, before its own lines."""
    monkeypatch.setattr(environment, "free_cores", lambda: (2, 1, 1.5))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["train", "--model", "tiny-llama", "--seq-len", "5000", "--output", str(tmp_path / "run")]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("chunkwise train: error: --seq-len 5000 is above the model's position limit")
        assert main(["verify", "--seq-len", "16", "--chunk-size", "4"]) == 0
        hints = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: torch runs 2 CPU threads")]
        assert len(hints) == 1
    finally:
        torch.set_num_threads(before)
