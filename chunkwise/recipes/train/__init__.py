"""The `chunkwise train` recipe.

    from chunkwise.recipes.train import TrainConfig, train
    result = train(TrainConfig(seq_len=2048, chunk_size=512))

Modules, in the order a run uses them: `config` (TrainConfig: every setting, its docstring and its check),
`setup` (run directory, what the model's config decides, data, model, objective, engine), `batches` (the
micro-batch order), `distributed` (one process, DDP, ZeRO, FSDP2; the torchrun process group), `step` (one
optimizer step), `state` (what a checkpoint holds, saved and restored), `heldout` (held-out evaluation),
`reporting` (metrics.jsonl, progress, loss.png), and `recipe` (TrainRecipe: setup → train → save).

`TrainRecipe` and `train` are imported on first use: the settings (`config`) load without torch, so that
`chunkwise train` checks its options before anything heavy loads.
"""

from chunkwise.recipes.train.config import TrainConfig, TrainingError, TrainResult

__all__ = ["TrainConfig", "TrainRecipe", "TrainResult", "TrainingError", "train"]


def __getattr__(name: str):
    """`TrainRecipe`, `train`: from `chunkwise.recipes.train.recipe`, imported when first asked for (PEP 562)."""
    if name not in ("TrainRecipe", "train"):
        raise AttributeError(f"module 'chunkwise.recipes.train' has no attribute {name!r}")
    from chunkwise.recipes.train import recipe

    return getattr(recipe, name)
