"""The run directory `chunkwise train` writes, and how `chunkwise eval` (or a user) reads it back.

    runs/demo/
      chunkwise_run.json    the run's id, settings (TrainConfig), their paths made absolute, and the package
                            version: marks a run
      metrics.jsonl         one line per step (and per evaluation)
      loss.png              loss curve (and held-out loss, the best step marked)
      best_eval.json        the held-out evaluation with the lowest loss: its step and scores
      checkpoints/step-000400/  the latest checkpoint (model or adapter, optimizer, scheduler, RNG, ...)
      model/                the final model (full fine-tuning: `AutoModelForCausalLM.from_pretrained`)
                            or LoRA adapter (`PeftModel.from_pretrained(base, ...)`), with the tokenizer

A model folder holds `config.json` + `model.safetensors` (full) or `adapter_config.json` +
`adapter_model.safetensors` (LoRA), and the tokenizer files, so each is usable without chunkwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers are imported by the loaders: the command line reads runs without them
    import torch

RUN_FILE = "chunkwise_run.json"
BEST_EVAL = "best_eval.json"
FINAL_MODEL = "model"
MODEL_SUBDIR = "model"  # inside a checkpoint folder
# Settings that may name a local file or folder. A run is resumed from wherever it now lies, under any
# spelling of the same path, so these are compared by what they resolve to, not as strings.
PATH_SETTINGS = ("model", "data", "eval_data", "ref_model")


def is_run_directory(path: Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def check_output(config) -> Path:
    """Refuse to mix runs in one directory unless told to resume or overwrite; nothing is written yet.

    `config`: a `TrainConfig` (its `output`, `resume` and `overwrite`). Returns the run directory's path.
    """
    output = Path(config.output).expanduser()
    blocking = next((path for path in (output, *output.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--output {output}: {blocking} is a file, not a directory; choose a directory path for the run")
    if config.resume:
        if not is_run_directory(output):
            raise ValueError(f"--resume: {output} holds no chunkwise run to continue (no {RUN_FILE}); drop --resume to start one")
    elif output.exists() and any(output.iterdir()):
        if not is_run_directory(output):
            raise ValueError(f"--output {output} is not empty and is not a chunkwise run; choose a new or empty directory")
        if not config.overwrite:
            raise ValueError(f"--output {output} holds another run; pass --resume to continue it or --overwrite to replace it")
    return output


def read_run_record(path: Path) -> dict:
    """The whole `chunkwise_run.json`: "run_id" (absent in runs made before ids), "config", "paths", "version"."""
    try:
        record = json.loads((Path(path) / RUN_FILE).read_text())
        if not isinstance(record.get("config"), dict):
            raise KeyError("config")
        return record
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{Path(path) / RUN_FILE} cannot be read ({error}); the run directory is damaged") from None


def read_run_settings(path: Path) -> dict:
    """The settings a run was started with (the `TrainConfig` fields)."""
    return read_run_record(path)["config"]


def resolved_paths(settings: dict) -> dict[str, str]:
    """The absolute form of each path-valued setting that names an existing file or folder (hub ids, presets and
    "synthetic" are left out): what `chunkwise_run.json` records, so that a resume from another working directory
    or with another spelling of the same path is recognised."""
    paths = {}
    for name in PATH_SETTINGS:
        value = settings.get(name)
        if isinstance(value, str) and Path(value).expanduser().exists():
            paths[name] = str(Path(value).expanduser().resolve())
    return paths


def model_folder_of_run(path: Path) -> Path:
    """The final model of a run, or its latest checkpoint's model when training did not finish."""
    from chunkwise.recipes.checkpoint import latest_checkpoint

    final = Path(path) / FINAL_MODEL
    if final.is_dir():
        return final
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"run directory {path} has neither a final model nor a checkpoint yet; nothing to load")
    return checkpoint / MODEL_SUBDIR


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def check_model_argument(name: str, *, option: str = "--model") -> None:
    """One line, before anything loads, for a `name` that `load_trained_model` cannot load: a path that does not
    exist, a file, or a folder that is neither a run directory, a model folder (config.json) nor an adapter folder.
    A hub id or a preset passes (they are checked when loaded)."""
    from chunkwise.models.names import DEMO_MODEL, TINY_PRESETS, local_model_path

    if name in (*TINY_PRESETS, DEMO_MODEL):
        return
    folder = local_model_path(name)  # FileNotFoundError for a missing path or a file
    if folder is None or is_run_directory(folder) or (folder / "config.json").is_file() or is_adapter_folder(folder):
        return
    raise ValueError(
        f"{option} {name}: {folder} has no config.json, so it is not a model folder (save_pretrained() writes one), nor a "
        f"chunkwise run directory (no {RUN_FILE}) or a LoRA adapter folder (no adapter_config.json); give one of these, "
        "a hub id or a tiny preset"
    )


def load_trained_model(path: str, *, dtype: torch.dtype | None = None, quantization=None,
                       compute_dtype: torch.dtype | None = None, device: torch.device | str = "cpu", trainable: bool = False):
    """Load a model for evaluation from a run directory, a model/adapter folder, a hub id or a tiny preset.

    Args:
        quantization: a `chunkwise.models.quantize.Quantization` for the base; None: the run's own (a run
            trained on a quantized base is evaluated on the same base), else none. A LoRA adapter loads on
            the quantized base and on the unquantized one alike.
        compute_dtype, device: as `load_causal_lm` takes them (used only for a quantized base).
        trainable: a LoRA adapter's weights take gradients (peft loads them frozen by default).
    Returns:
        `(model, tokenizer or None, settings of the run or None)`.
    """
    import torch
    from transformers import AutoTokenizer

    from chunkwise.models.loading import load_causal_lm, load_tokenizer, preset_text_vocab
    from chunkwise.models.quantize import NO_QUANTIZATION, quantization_of_settings

    check_model_argument(path)
    folder = Path(path).expanduser()
    settings = None
    if is_run_directory(folder):
        settings = read_run_settings(folder)
        folder = model_folder_of_run(folder)
    if quantization is None:
        quantization = quantization_of_settings(settings) if settings else NO_QUANTIZATION
    load = dict(dtype=dtype or torch.float32, quantization=quantization, compute_dtype=compute_dtype, device=device)
    if not folder.is_dir():  # a preset (with its byte tokenizer, so built with that vocabulary) or a hub id
        return load_causal_lm(path, vocab_size=preset_text_vocab(path), **load), load_tokenizer(path), None
    if is_adapter_folder(folder):
        model = _load_adapter(folder, settings, load, trainable=trainable)
    else:
        model = load_causal_lm(str(folder), **load)
    tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer, settings


def _load_adapter(folder: Path, settings: dict | None, load: dict, *, trainable: bool = False):
    """A LoRA adapter on the base model it was trained from (named in the run settings or the adapter config)."""
    from peft import PeftModel

    from chunkwise.models.loading import load_causal_lm, preset_text_vocab

    if settings is not None:
        base = settings["model"]
        seed = settings.get("seed", 0)
    else:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        seed = 0
    if not base:
        raise ValueError(
            f"{folder} holds a LoRA adapter but does not say which base model it belongs to; evaluate the run "
            "directory it came from, or set base_model_name_or_path in adapter_config.json"
        )
    # An adapter saved with a tokenizer was trained on text: a tiny-preset base was then built with the byte
    # tokenizer's vocabulary (on the synthetic task no tokenizer is saved and the preset keeps its own).
    vocab_size = preset_text_vocab(base) if (folder / "tokenizer_config.json").is_file() else None
    return PeftModel.from_pretrained(load_causal_lm(base, seed=seed, vocab_size=vocab_size, **load), str(folder), is_trainable=trainable)
