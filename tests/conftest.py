"""Shared fixtures: DeepSpeed on CPU, its C++ op built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# DeepSpeed's CPU accelerator builds a small shared-memory op with g++ the first time it starts. Building it
# here once, in its own process, keeps that out of every rank's start-up and stops two ranks compiling it at once.
# Built only where DeepSpeed itself would build it (a compiler is there): otherwise it runs without.
_BUILD = """
import deepspeed
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load()
"""


@pytest.fixture(scope="session")
def deepspeed_cpu(tmp_path_factory) -> dict:
    """Environment variables for processes that run DeepSpeed on CPU (its op already built); skips without deepspeed."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # an ImportError, or a broken install raising anything else on import
        pytest.skip(f"deepspeed cannot be imported ({type(error).__name__}: {error}); install chunkwise[deepspeed]")
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions"))}
    built = subprocess.run([sys.executable, "-c", _BUILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.fail(f"building DeepSpeed's CPU communication op failed:\n{built.stdout[-2000:]}\n{built.stderr[-3000:]}")
    return env
