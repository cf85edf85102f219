"""The model names chunkwise knows without loading anything (the tiny presets, the demo's model), and what a `--model`
that is a path must be: the command line checks `--model` with these before torch is imported (`chunkwise.models.presets`
and `chunkwise.models.loading` use them)."""

from __future__ import annotations

from pathlib import Path

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma3")
"""Tiny models built from configs (`chunkwise.models.presets.tiny_config`)."""

DEMO_MODEL = "demo-llama"
"""The built-in demo's model (`chunkwise train` without --model): built like a preset, vocabulary of the synthetic task."""


def local_model_path(name_or_path: str) -> Path | None:
    """The folder `name_or_path` names, None for a hub id; FileNotFoundError for a path that does not exist.

    A name that starts like a path (`.`, `/`, `~`) or exists on disk is a path, whatever else it looks like.
    """
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()
    if not looks_local:
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"model path {name_or_path!r} {what}; give a directory saved with save_pretrained(), "
            f"a hub id, or one of the tiny presets: {', '.join(TINY_PRESETS)}"
        )
    return path
