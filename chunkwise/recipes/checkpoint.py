"""Checkpoint folders that are either complete or absent: atomic writes, integrity checks, RNG state.

Layout inside a run directory:

    checkpoints/step-000050/     one complete checkpoint (what goes in it is the caller's business)
        ...files...
        manifest.json            written last: size and SHA-256 of every other file
    checkpoints/.tmp-step-000100-<pid>/   a checkpoint being written (ignored, removed later)

Why this shape: a run killed at any instant (Ctrl-C twice, SIGKILL, power loss) must still leave the
last good checkpoint intact. So a new checkpoint is written into a temporary folder, its manifest is
written last, everything is fsync'ed, and only then is the folder renamed into place (an atomic step
on POSIX file systems). Older checkpoints are removed only after that rename. On resume the manifest
is checked file by file, so a truncated or edited file is named, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_NAME = re.compile(r"step-(\d+)")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the folder and the file."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], *, keep: int = 1) -> Path:
    """Write a checkpoint for `step` atomically and keep only the newest `keep` checkpoints.

    Args:
        write: fills the (temporary) folder it is given with the checkpoint's files.
    Returns:
        The final folder, `run_dir/checkpoints/step-NNNNNN`.
    """
    temporary = begin_checkpoint(run_dir, step)
    if temporary is None:
        return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    write(temporary)
    return commit_checkpoint(run_dir, step, temporary, keep=keep)


def begin_checkpoint(run_dir: Path, step: int) -> Path | None:
    """An empty temporary folder to write `step`'s checkpoint into (several processes may write into it).

    Returns None when the checkpoint of this step exists already (e.g. interrupted again right after
    resuming): its content is this state, and it is checked, not rewritten.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    if final.exists():
        verify_checkpoint(final)
        return None
    temporary = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    return temporary


def commit_checkpoint(run_dir: Path, step: int, temporary: Path, *, keep: int = 1) -> Path:
    """Seal a written temporary folder: manifest, fsync, rename into place; then keep the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    files = sorted(p for p in temporary.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "files": {str(p.relative_to(temporary)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in [*files, temporary / MANIFEST, *{p.parent for p in files}]:
        _fsync(path)
    os.replace(temporary, final)
    _fsync(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints, and leftovers of interrupted writes."""
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = sorted(_complete_checkpoints(root))
    for _, folder in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(folder)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for folder in root.glob("step-*"):
        match = _NAME.fullmatch(folder.name)
        if match and (folder / MANIFEST).is_file():
            found.append((int(match.group(1)), folder))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder that has a manifest (None if there is none)."""
    complete = _complete_checkpoints(Path(run_dir) / CHECKPOINTS)
    return max(complete)[1] if complete else None


def verify_checkpoint(folder: Path) -> dict:
    """Check every file against the manifest; return the manifest.

    Raises:
        CheckpointError: naming the folder and the first missing, truncated or altered file.
    """
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} is incomplete: cannot read {MANIFEST} ({error})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its SHA-256 in {MANIFEST}")
    return manifest


# ----- random state ----------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every random generator a training step may draw from: torch (CPU and each GPU) and Python's."""
    import torch  # here, not above: the command line catches CheckpointError without loading torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
