"""Fixtures shared by test modules: one intra-op thread; DeepSpeed on CPU, its C++ op built once per test session,
in the background.

DeepSpeed's CPU accelerator builds a small shared-memory op with g++ the first time it starts (about a
minute of CPU). The build starts as soon as the session knows that a selected test uses DeepSpeed, in its
own process: it runs beside the single-process tests that come first, on the core they leave idle, and no
two ranks ever compile it at once. The `deepspeed_cpu` fixture waits for it. It is built in a fresh temporary
folder, removed after the session, unless TORCH_EXTENSIONS_DIR is set: then there, and kept for the next session
(e.g. to run the distributed tests in a loop without rebuilding it each time).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

# Built only where DeepSpeed itself would build it (a compiler is there): otherwise it runs without. A deepspeed
# that does not import exits with code 3 and the error, and the DeepSpeed tests skip with it.
_CANNOT_IMPORT = 3
_BUILD = """
import sys
try:
    import deepspeed
except Exception as error:
    print(f"{type(error).__name__}: {error}")
    sys.exit(3)
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load()
"""
_BUILD_TIMEOUT = 900  # seconds; the build takes about a minute of CPU, far longer on a loaded machine


class _DeepSpeedBuild:
    """The background build: its environment (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR) and process."""

    def __init__(self):
        self.kept = os.environ.get("TORCH_EXTENSIONS_DIR")
        self.folder = self.kept or tempfile.mkdtemp(prefix="chunkwise-torch-extensions-")
        self.env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": self.folder}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-c", _BUILD], env={**os.environ, **self.env},
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        try:
            code = self.process.wait(_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = "timeout"
        self.log.seek(0)
        output = self.log.read()
        if code == _CANNOT_IMPORT:
            pytest.skip(f"deepspeed cannot be imported ({output.strip().splitlines()[-1]}); pip install 'chunkwise[deepspeed]'")
        if code != 0:
            pytest.fail(f"building DeepSpeed's CPU communication op failed ({code}):\n{output[-4000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
        if not self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)


_build: _DeepSpeedBuild | None = None


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def pytest_collection_finish(session):
    global _build
    if _deepspeed_installed() and any("deepspeed_cpu" in getattr(item, "fixturenames", ()) for item in session.items):
        _build = _DeepSpeedBuild()


def pytest_sessionfinish(session, exitstatus):
    if _build is not None:
        _build.close()


@pytest.fixture(scope="session")
def deepspeed_cpu() -> dict:
    """Environment variables for processes that run DeepSpeed on CPU (its op built); skips without deepspeed."""
    if not _deepspeed_installed():
        pytest.skip("deepspeed is not installed; pip install 'chunkwise[deepspeed]'")
    global _build
    if _build is None:  # e.g. the fixture requested dynamically, after collection
        _build = _DeepSpeedBuild()
    _build.wait()
    return dict(_build.env)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost ~10x (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
