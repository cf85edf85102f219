"""The command line answers a mistake before it imports torch or transformers (seconds of import on a busy CPU).

Each case runs in a fresh interpreter and checks what was imported when the error was printed; this is not a
timed test (the report of issue 23 gives the timing: under a second for `chunkwise train --seq-len 0`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import contextlib, io, json, sys
from chunkwise.cli.main import main
results = []
for arguments in json.loads(sys.argv[1]):
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        code = main(arguments)
    results.append([code, error.getvalue()])
heavy = sorted(name for name in ("torch", "transformers", "peft", "deepspeed", "torchao") if name in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def run_fresh(cases: list[list[str]], cwd) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=120, cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_argument_and_path_errors_come_before_torch_is_imported(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty-model").mkdir()
    cases = {
        "--seq-len must be a positive integer, got 0": ["train", "--seq-len", "0"],
        "--lr must be a positive number": ["train", "--lr", "-1"],
        "--memory sets the budget of --chunk-size auto": ["train", "--memory", "2GiB", "--chunk-size", "512"],
        "--budget must be a positive integer": ["train", "--method", "spaco", "--budget", "0"],
        "--max-compensation must be a number >= 1": ["train", "--method", "spaco", "--budget", "2", "--max-compensation", "0.5"],
        "data file missing/corpus.txt does not exist": ["train", "--data", "missing/corpus.txt", "--model", "tiny-llama"],
        "model path './no/such/model' does not exist": ["train", "--model", "./no/such/model"],
        "a-file is a file, not a directory": ["train", "--output", "a-file/run"],
        "--seq-len must be at least 2": ["verify", "--seq-len", "1"],
        "has no config.json": ["verify", "--model", "empty-model"],
        "--chunk-size and --batch-size must be positive integers": ["eval", "--model", "tiny-llama", "--chunk-size", "0"],
    }
    report = run_fresh(list(cases.values()), tmp_path)
    for (expected, arguments), (code, error) in zip(cases.items(), report["results"]):
        assert code == 2 and expected in error and error.count("\n") == 1, (arguments, error)
    assert report["heavy"] == []


def test_importing_chunkwise_imports_no_torch_until_a_public_name_is_used():
    script = ("import sys, chunkwise; before = 'torch' in sys.modules; from chunkwise import SeCO, ChunkwiseConfig; "
              "print(before, 'torch' in sys.modules, SeCO.__module__, ChunkwiseConfig.__module__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True", "chunkwise.core.engine", "chunkwise.core.config"], result.stderr
