"""One optimizer step of `chunkwise train`: its micro-batches' backward (SeCO / SpaCO, or ordinary backprop),
the loss normalised over every target of the step on every rank, clipping, and the update.

    record = optimizer_step(context, step)       # a metrics.jsonl record: loss, grad_norm, lr, tokens/s, ...
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from chunkwise.core.batch import chunk_batch
from chunkwise.core.loss import count_targets, sequence_loss
from chunkwise.core.objectives import Objective, PairedLoss, Policy
from chunkwise.recipes.train.batches import BatchStream
from chunkwise.recipes.train.config import TrainConfig
from chunkwise.recipes.train.distributed import DataParallel, Distributed
from chunkwise.recipes.train.state import TrainingState
from chunkwise.utils.memory import peak_memory_bytes


def full_backward(model: torch.nn.Module, batch: dict, num_items: float, objective: Objective | None = None, policy: Policy | None = None):
    """Ordinary backprop of one micro-batch's loss over `num_items`; returns the detached loss and the
    objective's metrics. Cross-entropy by default; another objective runs on the full sequence's logits."""
    if "position_ids" in batch:
        # Packed documents: transformers finds the documents from the restarts of position_ids, but only
        # without a 2-D mask and without a cache. Right padding continues the last document's positions and
        # comes after every real token, so no real token can see it: the mask is not needed.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if objective is None:
        loss = sequence_loss(logits, batch["labels"], num_items=num_items)
        loss.backward()
        return loss.detach(), {}
    handle = policy.handle
    whole = chunk_batch(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"], num_items=num_items,
                        chunk_size=batch["input_ids"].shape[1], vocab_size=handle.vocab_size, hidden_size=handle.hidden_size, device=logits.device)
    bound = objective.bind(whole, num_items=num_items, policy=policy)
    loss = bound.full_sequence_loss(logits)
    loss.backward()
    return loss.detach(), bound.metrics()


def step_backward(model, engine, batches: list[dict], *, num_items: float, autocast_dtype, device, backend: DataParallel, objective=None, policy=None,
                  metrics: dict | None = None) -> float:
    """Fill `.grad` with the gradient of (sum of the step's losses) / num_items; return that loss.

    `metrics`, if given, collects the objective's statistics: a list of per-micro-batch values per name.
    """
    total = 0.0
    for number, batch in enumerate(batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        # Across ranks only the step's last micro-batch reduces the gradients; the engine reads it from the wrapper.
        with backend.micro_batch(last=number == len(batches) - 1), \
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if engine is None:
                loss, extra = full_backward(model, batch, num_items, objective, policy)
            else:
                # position_ids only with packed documents (they restart at each document start).
                packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
                out = engine.backward(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                                      num_items=num_items, objective=objective, **packed)
                loss, extra = out.loss, out.metrics
        total += float(loss)
        for key, value in extra.items():
            if metrics is not None:
                metrics.setdefault(key, []).append(value)
    return total


def _pad_to(batch: dict, width: int, pad: int) -> dict:
    """Right-pad a collated batch (`input_ids`, `attention_mask`, `labels`, each `[B, T]`; `position_ids` if packed) to `[B, width]`."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad, "attention_mask": 0, "labels": -100}
    padded = {key: torch.nn.functional.pad(value, (0, extra), value=fill[key]) for key, value in batch.items() if key in fill}
    if "position_ids" in batch:  # padding continues each row's last positions, as `collate` pads them
        positions = batch["position_ids"]
        padded["position_ids"] = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1)], dim=1)
    return padded


def count_items(batch: dict, objective: Objective | None) -> int:
    """What a micro-batch's loss is normalised by: its valid targets, or its pairs for a preference objective."""
    if isinstance(objective, PairedLoss):
        return batch["input_ids"].shape[0] // 2
    return count_targets(batch["labels"])


@dataclass
class StepContext:
    """What one optimizer step needs, set up once by the recipe (`TrainRecipe.setup`)."""

    config: TrainConfig
    """The resolved settings (grad_accum, seq_len, max_grad_norm are read here)."""
    dist: Distributed
    """This rank among the ranks: which micro-batches are its own, and the sums over ranks."""
    device: torch.device
    state: TrainingState
    """The model, its data-parallel backend, engine, scheduler and loss scaler."""
    data: BatchStream
    autocast_dtype: torch.dtype | None
    """Autocast's dtype (bfloat16, float16), or None to run in the weights' dtype."""
    objective: Objective | None = None
    """A preference objective, or None: cross-entropy."""
    policy: Policy | None = None
    """The trained model as the objective sees it (its log-probs)."""


def optimizer_step(context: StepContext, step: int) -> dict:
    """Optimizer step number `step` (1-based): its micro-batches' backward, clipping, the update unless the
    loss or gradient is non-finite, the schedule. Returns the step's `metrics.jsonl` record."""
    config, dist, state = context.config, context.dist, context.state
    scaler = state.scaler
    started = time.perf_counter()
    first_index = (step - 1) * config.grad_accum * dist.world_size
    batches = [context.data.batch(first_index + a * dist.world_size + dist.rank) for a in range(config.grad_accum)]
    if state.engine is not None and state.engine.sync.lockstep:
        # ZeRO-3: every rank must run as many chunks as the others (see chunkwise.core.sync).
        batches = [_pad_to(batch, config.seq_len, context.data.pad) for batch in batches]
    (global_targets,) = dist.all_sum([float(sum(count_items(b, context.objective) for b in batches))])
    global_targets = max(global_targets, 1.0)
    # DDP averages gradients over ranks; dividing by (all targets / ranks) makes the result the gradient
    # of the mean over every target of the step, as one process with the whole batch. float16: the loss
    # scaler's factor goes into the normaliser, so the backward is scaled as `scaler.scale(loss)` would be.
    loss_scale = float(scaler.scale(torch.ones((), device=context.device))) if scaler.is_enabled() else 1.0
    num_items = global_targets / dist.world_size / loss_scale
    state.model.train()
    objective_metrics = {}
    loss_sum = step_backward(
        state.backend.engine_model, state.engine, batches, num_items=num_items, autocast_dtype=context.autocast_dtype,
        device=context.device, backend=state.backend, objective=context.objective, policy=context.policy, metrics=objective_metrics,
    )
    (loss_sum,) = dist.all_sum([loss_sum * num_items])  # the summed loss, unscaled
    loss = loss_sum / global_targets

    # Under float16 an infinite gradient is the scaler's business (it skips the update and lowers the scale).
    # DeepSpeed decides itself: it skips a step whose gradient is not finite.
    grad_norm, applied = state.backend.step(
        max_grad_norm=config.max_grad_norm, scaler=scaler,
        finite=lambda norm: math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()),
    )
    finite = applied and math.isfinite(loss)
    state.scheduler.step()

    seconds = time.perf_counter() - started
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * dist.world_size
    return {
        "kind": "train", "step": step, "loss": loss if finite else None, "skipped": not finite,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "lr": state.scheduler.get_last_lr()[0],
        "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
        "peak_memory_bytes": peak_memory_bytes(context.device),
        # e.g. DPO's rewards/margins, averaged over this rank's micro-batches
        **{key: sum(values) / len(values) for key, values in objective_metrics.items()},
    }
