"""What `chunkwise train` can check before anything heavy loads: every setting, the run directory, and the local
paths it names (model, reference model, data, held-out data).

This module and what it imports load no torch and no transformers, so a mistake on the command line is reported
in a fraction of a second, not after the seconds those imports take. The checks that need a model's config (its
position limit, `--chunk-size auto`) come later, in `chunkwise.recipes.train.setup`, still before any weight loads.
"""

from __future__ import annotations

from chunkwise.data.files import check_data_path
from chunkwise.data.names import SYNTHETIC
from chunkwise.models.names import DEMO_MODEL, TINY_PRESETS, local_model_path
from chunkwise.recipes.run import check_output
from chunkwise.recipes.train.config import TrainConfig


def preflight(config: TrainConfig) -> TrainConfig:
    """`config` resolved and checked (`TrainConfig.resolved`), its run directory and local paths checked.

    Raises:
        ValueError: a setting out of range, or an `--output` that cannot take this run (names the option).
        FileNotFoundError: a model path that does not exist or is not a folder.
        DataError: a data path meant as local that does not exist.
    """
    resolved = config.resolved()
    check_output(resolved)
    for option, model in (("--model", resolved.model), ("--ref-model", resolved.ref_model)):
        folder = None if model in (None, *TINY_PRESETS, DEMO_MODEL) else local_model_path(model)
        if folder is not None and not (folder / "config.json").is_file():
            raise ValueError(f"{option} {model}: {folder} has no config.json, so it is not a model folder (save_pretrained() writes "
                             "one); give a model folder, a hub id or a tiny preset")
    for data in (resolved.data, resolved.eval_data):
        if data not in (None, SYNTHETIC):
            check_data_path(data)
    return resolved
