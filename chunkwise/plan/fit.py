"""What fits a memory budget: the chunk `--chunk-size auto` picks, the longest length, and why a step cannot fit.

    budget = Budget(24 * GiB, "given by --memory")
    plan = fit_chunk_size(shape, training, seq_len=32768, budget=budget)     # the largest chunk that fits
    plan = auto_chunk_plan(model_config, name="...", training=training, seq_len=32768, method="seco",
                           offload_kv=False, device=torch.device("cuda"))      # both --chunk-size auto entry points
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkwise.plan.memory import MethodPlan, describe_parts, method_plan
from chunkwise.plan.shape import ModelShape, PlanError, Training
from chunkwise.utils.memory import format_bytes, host_available_memory

# `--chunk-size auto` keeps this share of the budget free: the planner's error on the validation cases
# (docs/plan.md) plus allocator slack.
AUTO_MARGIN = 0.10
MIN_AUTO_CHUNK = 64
# `longest_length` searches no further (16M tokens): an offloaded cache stops device memory from growing.
LONGEST_SEARCH_LIMIT = 1 << 24


@dataclass(frozen=True)
class Budget:
    """Memory a step may use: `free` bytes less the `AUTO_MARGIN` share (`usable`).

    Attributes:
        free: the device's free memory, or what the user gave (`--memory`).
        source: where `free` comes from, for messages ("--memory", "free on cuda:0", ...).
        host_free: host memory for an offloaded KV cache on a GPU (None: not checked).
    """

    free: int
    source: str
    host_free: int | None = None

    @property
    def usable(self) -> int:
        return int(self.free * (1 - AUTO_MARGIN))

    @property
    def host_usable(self) -> int | None:
        return None if self.host_free is None else int(self.host_free * (1 - AUTO_MARGIN))

    def admits(self, plan: MethodPlan, device_type: str) -> bool:
        if plan.total(device_type) > self.usable:
            return False
        return device_type == "cpu" or self.host_usable is None or plan.host <= self.host_usable

    def describe(self) -> str:
        return f"{format_bytes(self.usable)} usable ({format_bytes(self.free)} {self.source}, less the {AUTO_MARGIN:.0%} margin)"


def device_budget(device, *, memory: int | None = None, held: int = 0) -> Budget:
    """The budget of a step on `device` (a torch.device): `memory` bytes if given, else its free memory
    (CUDA: `torch.cuda.mem_get_info`, which counts other processes; CPU: `host_available_memory`) plus
    `held`, what the step's own tensors (weights, gradients, optimizer state) already occupy there."""
    import torch

    host = host_available_memory()
    if memory is not None:
        return Budget(memory, "given by --memory", host if device.type == "cuda" else None)
    source = " plus what the model already holds" if held else ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget(free + held, f"free on {device}{source}", host)
    return Budget(host + held, f"of RAM available{source}")


def auto_chunk_plan(model_config, *, name: str, training: Training, seq_len: int, method: str, offload_kv: bool, device,
                    memory: int | None = None, held: int = 0) -> MethodPlan:
    """`--chunk-size auto`'s one decision, for both its entry points (`plan_training_step` before `chunkwise
    train` loads any weight, `chunkwise.integrations.trainer.plan_for_model` for a loaded model): the plan with
    the largest chunk whose step fits `device`'s budget (`device_budget` with `memory` and `held`); for method
    "full" the plan of the step, if it fits. `offload_kv` plans seco+offload whatever `method` says.

    Raises:
        PlanError: the config is not a decoder-only causal LM, or nothing fits (with the planner's numbers,
            see `fit_chunk_size`).
    """
    shape = ModelShape.from_config(model_config, name=name)
    method = "seco+offload" if offload_kv else method
    return fit_chunk_size(shape, training, seq_len=seq_len, budget=device_budget(device, memory=memory, held=held), method=method)


def plan_training_step(model_config, *, name: str, seq_len: int, precision: str, device, method: str, offload_kv: bool = False,
                       memory: int | None = None, **training_options) -> MethodPlan:
    """`chunkwise train --chunk-size auto`, before any weight loads: `auto_chunk_plan` for the precision
    `chunkwise train --dtype` runs (`Training.from_precision` with `training_options`).

    Raises:
        PlanError: nothing fits, with the planner's numbers (see `fit_chunk_size`).
    """
    training = Training.from_precision(precision, device_type=device.type, **training_options)
    return auto_chunk_plan(model_config, name=name, training=training, seq_len=seq_len, method=method, offload_kv=offload_kv,
                           device=device, memory=memory)

def _candidate_chunks(seq_len: int) -> list[int]:
    """The chunk sizes `--chunk-size auto` considers, largest first: the whole sequence (one chunk),
    then powers of two below it, down to `MIN_AUTO_CHUNK`."""
    chunks = [seq_len]
    size = 1 << (seq_len - 1).bit_length() - 1 if seq_len > 1 else 1
    while size >= MIN_AUTO_CHUNK:
        if size < seq_len:
            chunks.append(size)
        size //= 2
    return chunks


def largest_fitting(shape: ModelShape, training: Training, seq_len: int, budget: Budget, method: str) -> tuple[MethodPlan | None, MethodPlan]:
    """(the fitting plan with the largest candidate chunk or None, the last plan tried)."""
    if method in ("full", "ckpt"):
        plan = method_plan(shape, training, method, seq_len=seq_len)
        return (plan if budget.admits(plan, training.device_type) else None), plan
    for chunk in _candidate_chunks(seq_len):
        plan = method_plan(shape, training, method, seq_len=seq_len, chunk_size=chunk)
        if budget.admits(plan, training.device_type):
            return plan, plan
    return None, plan


def fit_chunk_size(shape: ModelShape, training: Training, *, seq_len: int, budget: Budget, method: str = "seco") -> MethodPlan:
    """The plan with the largest chunk (see `_candidate_chunks`) whose step fits `budget`.

    Raises:
        PlanError: nothing fits; the message has the planner's numbers for the smallest chunk, the
            longest length that fits, and whether offloading the KV cache would.
    """
    plan, tried = largest_fitting(shape, training, seq_len, budget, method)
    if plan is None:
        raise PlanError(_refusal(shape, training, tried, budget))
    return plan


def longest_length(shape: ModelShape, training: Training, method: str, *, budget: Budget, chunk_size: int | None = None,
                   limit: int = LONGEST_SEARCH_LIMIT) -> MethodPlan | None:
    """The plan of the longest sequence `method` trains within `budget` (None if not even 2 tokens fit).

    With `chunk_size` None the chunk is chosen as `fit_chunk_size` does at each length, so at the limit
    it is the smallest. The search stops at `limit` tokens.
    """

    def fitting(length: int) -> MethodPlan | None:
        if method in ("full", "ckpt"):
            plan = method_plan(shape, training, method, seq_len=length)
            return plan if budget.admits(plan, training.device_type) else None
        if chunk_size is not None:
            plan = method_plan(shape, training, method, seq_len=length, chunk_size=chunk_size)
            return plan if budget.admits(plan, training.device_type) else None
        return largest_fitting(shape, training, length, budget, method)[0]

    best = fitting(2)
    if best is None:
        return None
    low, high = 2, None
    while high is None:  # double until a length does not fit
        length = min(low * 2, limit)
        plan = fitting(length)
        if plan is None:
            high = length
        else:
            low, best = length, plan
            if length == limit:
                return best
    while high - low > 1:
        middle = (low + high) // 2
        plan = fitting(middle)
        if plan is None:
            high = middle
        else:
            low, best = middle, plan
    return best



def _refusal(shape: ModelShape, training: Training, plan: MethodPlan, budget: Budget) -> str:
    """Why a length cannot fit, with the numbers and what would."""
    chunk = f" with {plan.chunk_size}-token chunks" if plan.chunk_size else ""
    lines = [f"{plan.seq_len} tokens x {training.batch_size} do not fit: {plan.method}{chunk} needs "
             f"{format_bytes(plan.total(training.device_type))} ({describe_parts(plan)}; peak at the {plan.phase}) but "
             f"{budget.describe()}."]
    longest = longest_length(shape, training, plan.method, budget=budget)
    if longest is not None:
        lines.append(f"The longest sequence that fits is {longest.seq_len} tokens.")
    if plan.method in ("seco", "spaco"):
        offloaded, _ = largest_fitting(shape, training, plan.seq_len, budget, "seco+offload")
        if offloaded is not None:
            lines.append(f"With --offload-kv it fits ({offloaded.chunk_size}-token chunks, {format_bytes(offloaded.peak)} on the device, "
                         f"{format_bytes(offloaded.host)} in host memory).")
    return " ".join(lines)
