"""`chunkwise export`: a run's model as one plain transformers folder, its LoRA adapter merged into the weights.

    export_model("runs/books", "books-merged")      # AutoModelForCausalLM.from_pretrained("books-merged") loads it

A LoRA run leaves an adapter folder, which needs peft and the base model to load. Exporting loads the base as
the run names it, unquantized (a QLoRA adapter is merged into the base's full-precision weights, as peft's
`merge_and_unload` does for any base), adds the adapter, merges it (W + B·A·scale) and saves the result with
the tokenizer. A full fine-tuning run's model is saved again as it is, in the dtype asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        output: the model folder.
        merged: True when a LoRA adapter was merged into the base (False: the model was saved as it was).
        parameters: the exported model's parameter count.
        tokenizer: whether a tokenizer was saved beside it.
    """

    output: Path
    merged: bool
    parameters: int
    tokenizer: bool


def export_model(path: str, output: str, *, dtype: torch.dtype = torch.float32) -> ExportResult:
    """Load `path` (a run directory, a model or adapter folder), merge any LoRA adapter, save to `output`.

    Raises:
        ValueError: `output` exists and is not an empty folder (nothing is overwritten), or `path` holds no model.
    """
    from peft import PeftModel

    from chunkwise.models.quantize import NO_QUANTIZATION
    from chunkwise.recipes.run import load_trained_model

    target = Path(output).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--output {target} exists and is not an empty folder; choose a new folder for the exported model")
    model, tokenizer, _ = load_trained_model(path, dtype=dtype, quantization=NO_QUANTIZATION)
    merged = isinstance(model, PeftModel)
    if merged:
        model = model.merge_and_unload()  # W + scale * B @ A in place, the adapter modules removed
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return ExportResult(target, merged, sum(p.numel() for p in model.parameters()), tokenizer is not None)
