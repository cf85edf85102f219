"""The `chunkwise train` recipe.

    from chunkwise.recipes.train import TrainConfig, train
    result = train(TrainConfig(seq_len=2048, chunk_size=512))

Modules, in the order a run uses them: `config` (TrainConfig: every setting, its docstring and its check),
`setup` (run directory, what the model's config decides, data, model, objective, engine), `batches` (the
micro-batch order), `distributed` (one process, DDP, ZeRO, FSDP2; the torchrun process group), `step` (one
optimizer step), `state` (what a checkpoint holds, saved and restored), `heldout` (held-out evaluation),
`reporting` (metrics.jsonl, progress, loss.png), and `recipe` (TrainRecipe: setup → train → save).
"""

from chunkwise.recipes.train.config import TrainConfig, TrainingError, TrainResult
from chunkwise.recipes.train.recipe import TrainRecipe, train

__all__ = ["TrainConfig", "TrainRecipe", "TrainResult", "TrainingError", "train"]
