"""Data parallelism for `chunkwise train`: one process, DDP, DeepSpeed ZeRO-1/2/3 or FSDP2 under torchrun,
and the torchrun plumbing around them (joining the process group, a lost rank's error).

    backend = distributed.setup(model, make_optimizer, zero=2, fsdp=False, world_size=2, device=device, ...)
    engine = SeCO(backend.engine_model, chunk_size=...)        # DDP wrapper, DeepSpeed engine, or sharded model
    for micro_batch, last in ...:
        with backend.micro_batch(last=last):                   # gradient accumulation: reduce after the last
            engine.backward(...)
    grad_norm, applied = backend.step(max_grad_norm=1.0, finite=..., scaler=scaler)

Each set-up wraps the model for the engine (`chunkwise.core.sync` then reduces the gradient once per step),
says which micro-batch ends the step in its own terms, takes the optimizer step (clipping included), and
saves and restores what a checkpoint needs. ZeRO and FSDP2 shard the optimizer state — and ZeRO-3 and FSDP2
the parameters — so every rank writes its shard into the checkpoint folder (`sharded`), and the full model
for `save_pretrained` is gathered from the shards (`model_state`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from chunkwise.core.handle import unwrap_causal_lm
from chunkwise.recipes.train.config import TrainConfig, TrainingError
from chunkwise.utils.precision import resolve_device

OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"  # inside a checkpoint: every rank's shard of the model and optimizer state


def _tie_shared(model: torch.nn.Module, state: dict) -> dict:
    """Make tied weights (one parameter under two names, e.g. embeddings and LM head) one tensor again in a
    gathered state dict, so that `save_pretrained` stores them once, as it does for the model itself."""
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and first in state and name in state:
            state[name] = state[first]
    return state


class DataParallel:
    """One process: the model as it is, a plain optimizer. The base of the set-ups below."""

    name = "one process"
    sharded = False  # whether every rank writes its own part of a checkpoint

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.parameters)
        self.engine_model = model  # what the engine (or ordinary backprop) calls

    def micro_batch(self, *, last: bool):
        """Context for one micro-batch's backward; `last`: it ends the optimizer step (gradients reduce after it)."""
        return contextlib.nullcontext()

    def step(self, *, max_grad_norm: float | None, finite: Callable[[float], bool], scaler: torch.amp.GradScaler) -> tuple[float, bool]:
        """Clip and take the optimizer step unless `finite(grad_norm)` says no; clear the gradients.

        Returns:
            The gradient norm before clipping, and whether the update was applied.
        """
        scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_grad_norm or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        applied = finite(grad_norm)
        if applied:
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def model_state(self) -> dict | None:
        """The full model state for `save_pretrained` (None: the model's own); called on every rank."""
        return None

    def save_state(self, folder: Path, *, is_main: bool) -> None:
        """Write the optimizer state (and, when `sharded`, this rank's model shard) into a checkpoint folder."""
        if is_main:
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote (a `sharded` set-up restores the model weights too)."""
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))


class DistributedDataParallel(DataParallel):
    """DDP: every rank holds the whole model and optimizer state; gradients are all-reduced."""

    name = "DistributedDataParallel"

    def __init__(self, model, make_optimizer, *, device: torch.device):
        super().__init__(model, make_optimizer)
        self.engine_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def micro_batch(self, *, last: bool):
        return contextlib.nullcontext() if last else self.engine_model.no_sync()


class FullyShardedDataParallel(DataParallel):
    """FSDP2: parameters, gradients and optimizer state sharded across ranks (`parallel.shard_fsdp2`).

    Checkpoints are `torch.distributed.checkpoint` folders of the sharded model and optimizer state, each rank
    writing its own shards; they restore only on the same number of ranks, like every chunkwise checkpoint.
    """

    name = "FSDP2"
    sharded = True

    def __init__(self, model, make_optimizer):
        from chunkwise.core.sync import shard_fsdp2

        shard_fsdp2(model)
        super().__init__(model, make_optimizer)  # the optimizer sees the shards
        self.lm = unwrap_causal_lm(model)

    def micro_batch(self, *, last: bool):
        # FSDP2's own gradient-accumulation switch; the engine reads it (see parallel.FSDP2Sync).
        self.lm.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank gathers, rank 0 keeps the full tensors (on the CPU).
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _tie_shared(self.model, state)

    def save_state(self, folder: Path, *, is_main: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDED_DIR))

    def load_state(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class DeepSpeedZeRO(DataParallel):
    """DeepSpeed ZeRO stage 1, 2 or 3 around the model and the optimizer (DeepSpeed clips and steps).

    Stage 1 shards the optimizer state, 2 the gradients too, 3 the parameters too. The learning-rate schedule
    stays the caller's (it sets the learning rate in the optimizer's parameter groups, which DeepSpeed's
    optimizer reads). Checkpoints are DeepSpeed's own (`save_checkpoint`), each rank writing its partitions.
    """

    sharded = True

    def __init__(self, model, make_optimizer, *, stage: int, device: torch.device, micro_batch_size: int,
                 accumulation: int, max_grad_norm: float | None):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed guesses, and warns that it did
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # joins torchrun's process group
        self.name = f"DeepSpeed ZeRO-{stage}"
        hidden = unwrap_causal_lm(model).config.hidden_size
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": max_grad_norm or 0.0,  # DeepSpeed's default would be 1.0
            # Buckets sized to the model, as transformers' "auto" does: DeepSpeed's defaults (5e8 elements) would
            # give ZeRO-3 a 2 GB float32 reduction buffer whatever the model.
            "zero_optimization": {"stage": stage, "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                                  "stage3_param_persistence_threshold": 10 * hidden},
            "steps_per_print": 1 << 30,  # chunkwise logs the steps
        }
        # DeepSpeed wraps this optimizer and shares its parameter groups: a scheduler on it sets the learning rate.
        self.optimizer = make_optimizer(self.parameters)
        self.engine_model, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.stage = stage

    def micro_batch(self, *, last: bool):
        # DeepSpeed's gradient-accumulation signal, as accelerate sets it; the engine reads it (parallel.DeepSpeedSync).
        self.engine_model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def step(self, *, max_grad_norm, finite, scaler) -> tuple[float, bool]:
        # DeepSpeed clips, skips the update when the gradient is not finite, and clears the gradients.
        self.engine_model.step()
        grad_norm = self.engine_model.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return grad_norm, bool(self.engine_model.was_step_applied())

    def model_state(self) -> dict | None:
        if self.stage < 3:
            return None  # ZeRO-1/2 keep the whole parameters on every rank
        import deepspeed

        # Forwards without a backward (held-out evaluation) leave parameters gathered or in flight, which
        # GatheredParameters would refuse to partition again on leaving: release them all first.
        self.engine_model.empty_partition_cache()
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            return _tie_shared(self.model, {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()})

    def save_state(self, folder: Path, *, is_main: bool) -> None:
        self.engine_model.save_checkpoint(str(folder / SHARDED_DIR), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine_model.load_checkpoint(str(folder / SHARDED_DIR), tag="state", load_lr_scheduler_states=False)
        if path is None:
            from chunkwise.recipes.checkpoint import CheckpointError

            raise CheckpointError(f"{folder / SHARDED_DIR} holds no DeepSpeed state for this run")


def setup(model: torch.nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer], *, world_size: int,
          device: torch.device, zero: int | None = None, fsdp: bool = False, micro_batch_size: int = 1,
          accumulation: int = 1, max_grad_norm: float | None = None) -> DataParallel:
    """The data-parallel set-up for `world_size` ranks: DDP by default, ZeRO with `zero`, FSDP2 with `fsdp`."""
    if zero is not None:
        return DeepSpeedZeRO(model, make_optimizer, stage=zero, device=device, micro_batch_size=micro_batch_size,
                             accumulation=accumulation, max_grad_norm=max_grad_norm)
    if fsdp:
        return FullyShardedDataParallel(model, make_optimizer)
    if world_size > 1:
        return DistributedDataParallel(model, make_optimizer, device=device)
    return DataParallel(model, make_optimizer)


# ----- torchrun: the process group ----------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over every rank (float64, so counts stay exact)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_distributed(*, device: str, timeout_s: float) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1): nccl on GPUs, gloo on CPU; `device` as --device says."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return Distributed(torch.distributed.get_rank(), world_size), device


def is_lost_rank(error: BaseException) -> bool:
    """True for a collective that failed because another rank is gone or silent past the timeout.

    nccl raises `torch.distributed.DistError`s; gloo raises plain RuntimeErrors from its transport
    ("Connection closed by peer", "Timed out waiting ... for recv"), recognisable by gloo's source path.
    """
    return isinstance(error, torch.distributed.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


def lost_rank_error(error: BaseException, dist: Distributed, config: TrainConfig) -> TrainingError:
    """The one-line error of a rank whose peers are gone: what happened, and that --resume continues the run."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TrainingError(
        f"rank {dist.rank} of {dist.world_size} stopped: it lost contact with another rank, which crashed, was "
        f"killed, or did not answer within --dist-timeout {config.dist_timeout:g} s (see that rank's output above). "
        f"Checkpoints already written in {config.output} are intact; continue with --resume. [{reason}]"
    )
