"""What a `chunkwise train` checkpoint holds, and its I/O: `TrainingState` saves and restores itself.

A checkpoint folder (written atomically, `chunkwise.recipes.checkpoint`) holds model/ (loadable with
`from_pretrained`, the adapter alone for LoRA), the optimizer state (or every rank's shard of it), the
scheduler, the loss scaler, every rank's RNG states, SpaCO's sampler, and state.json (the step counters and
the settings), so that a resumed run continues with exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkwise.core.engine import SeCO, SpaCO
from chunkwise.recipes.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    begin_checkpoint,
    capture_rng_state,
    checkpoint_name,
    commit_checkpoint,
    latest_checkpoint,
    restore_rng_state,
    verify_checkpoint,
)
from chunkwise.recipes.run import MODEL_SUBDIR, read_run_record
from chunkwise.recipes.train.config import TrainConfig
from chunkwise.recipes.train.distributed import DataParallel, Distributed


@dataclass
class TrainingState:
    """The objects a run trains and checkpoints, and its step counters."""

    model: torch.nn.Module
    """The trained model (LoRA-wrapped unless --lora-r 0), unwrapped: `save_pretrained` is called on it."""
    tokenizer: object | None
    """Saved with the model, so that model/ loads without chunkwise; None for tiny presets."""
    backend: DataParallel
    """One process, DDP, ZeRO or FSDP2: owns the optimizer and the (sharded) optimizer state."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    """float16's loss scaler (disabled otherwise; its state is saved all the same)."""
    engine: SeCO | None
    """The engine (None for --method full); SpaCO's sampler state is checkpointed."""
    step: int = 0
    """Optimizer steps taken."""
    bad_in_a_row: int = 0
    """Steps skipped in a row for a non-finite loss or gradient (the run stops at --max-bad-steps)."""
    skipped: int = 0
    """Steps skipped in all."""

    def counters(self) -> dict:
        return {"step": self.step, "bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped}

    def save(self, output: Path, *, config: TrainConfig, dist: Distributed) -> Path | None:
        """Checkpoint the current step into `output`/checkpoints; returns its folder (None on ranks other than 0).

        Every rank takes part (sharded state, RNG states); rank 0 writes the rest and seals the folder.
        """
        rng = capture_rng_state()
        ranks_rng = [rng]
        if dist.world_size > 1:
            ranks_rng = [None] * dist.world_size
            torch.distributed.all_gather_object(ranks_rng, rng)
        model_state = self.backend.model_state()  # a collective when the parameters are sharded

        def write(folder: Path) -> None:
            save_model(folder / MODEL_SUBDIR, self.model, self.tokenizer, state_dict=model_state)
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(self.scaler.state_dict(), folder / "scaler.pt")
            torch.save(ranks_rng, folder / "rng.pt")
            if isinstance(self.engine, SpaCO):
                torch.save(self.engine.state_dict(), folder / "sampler.pt")
            record = {**self.counters(), "world_size": dist.world_size, "run_id": read_run_record(output).get("run_id"),
                      "config": dataclasses.asdict(config)}
            (folder / "state.json").write_text(json.dumps(record, indent=1))

        # Rank 0 opens the temporary folder; every rank writes its part (the optimizer state, or its shards);
        # rank 0 adds the rest and renames the folder into place.
        temporary = begin_checkpoint(output, self.step) if dist.is_main else None
        if dist.world_size > 1:
            shared = [temporary]
            torch.distributed.broadcast_object_list(shared, src=0)
            (temporary,) = shared
        final = None
        if temporary is not None:
            self.backend.save_state(temporary, is_main=dist.is_main)
            if dist.world_size > 1:
                torch.distributed.barrier()  # every shard is written
            if dist.is_main:
                write(temporary)
                final = commit_checkpoint(output, self.step, temporary, keep=config.keep_checkpoints)
        elif dist.is_main:
            final = output / CHECKPOINTS / checkpoint_name(self.step)  # this step's checkpoint exists (checked)
        if dist.world_size > 1:
            torch.distributed.barrier()
        return final

    def load(self, output: Path, *, dist: Distributed, log: Callable[[str], None]) -> None:
        """Restore everything the latest checkpoint in `output` holds; errors name the checkpoint and the file,
        and delete nothing."""
        folder = latest_checkpoint(output)
        if folder is None:
            raise CheckpointError(f"--resume: {output} has no complete checkpoint yet; start again with --overwrite")
        verify_checkpoint(folder)
        saved = json.loads((folder / "state.json").read_text())
        if saved["world_size"] != dist.world_size:
            raise CheckpointError(f"{folder} was written by a run with a different number of processes; resume with the same number")
        run_id = read_run_record(output).get("run_id")
        if None not in (run_id, saved.get("run_id")) and saved["run_id"] != run_id:  # runs made before ids have none
            raise CheckpointError(f"{folder} belongs to another run (id {saved['run_id']}) than the one in {output} (id {run_id}); "
                                  "copy a run directory whole, checkpoints and chunkwise_run.json together")
        if not self.backend.sharded:
            load_weights(self.model, folder / MODEL_SUBDIR)
        self.backend.load_state(folder)  # the optimizer state; sharded set-ups restore the model's shards too
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        if isinstance(self.engine, SpaCO):
            self.engine.load_state_dict(torch.load(folder / "sampler.pt", weights_only=False))
        restore_rng_state(torch.load(folder / "rng.pt", weights_only=False)[dist.rank])
        self.step, self.bad_in_a_row, self.skipped = saved["step"], saved["bad_in_a_row"], saved["skipped"]
        log(f"resumed from {folder} (step {self.step})")


def save_model(folder: Path, model, tokenizer, *, state_dict: dict | None = None) -> None:
    """`save_pretrained` (the adapter alone for a PEFT model) and the tokenizer: loadable without chunkwise.

    `state_dict`: the full weights when the model itself holds only this rank's shards (ZeRO-3, FSDP2).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of training output
    with _deepspeed_only_if_imported():
        model.save_pretrained(str(folder), **({} if state_dict is None else {"state_dict": state_dict}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_weights(model, folder: Path) -> None:
    """Load the trainable weights a checkpoint's model folder holds into the freshly built `model`."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{folder}/adapter_model.safetensors does not fit this model (unexpected {unexpected[:3]})")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint model folder {folder} has no model.safetensors")
    weights = {}
    for file in files:
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded = {t.data_ptr() for name, t in model.state_dict().items() if name in weights}
    really_missing = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]  # tied weights are shared
    if really_missing or unexpected:
        raise CheckpointError(f"{folder} does not fit this model (missing {really_missing[:3]}, unexpected {unexpected[:3]})")


@contextlib.contextmanager
def _deepspeed_only_if_imported():
    """Within: accelerate's model unwrapping (which `save_pretrained` calls) does not import deepspeed.

    accelerate imports deepspeed whenever it is installed, only to test `isinstance(model, DeepSpeedEngine)`;
    the import takes seconds and prints DeepSpeed's "Setting accelerator to CPU" warning in every run. No
    DeepSpeed engine can exist before deepspeed is imported (`--zero` imports it), so until then the test is
    skipped, as peft's `import_utils` leaves an optional dependency alone until it is used.
    """
    try:
        from accelerate.utils import other
    except ImportError:
        other = None
    if other is None or "deepspeed" in sys.modules or not hasattr(other, "is_deepspeed_available"):
        yield
        return
    original = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = original
