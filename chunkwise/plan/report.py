"""`chunkwise plan`'s whole answer for one model and setting: each method's breakdown, the recommended chunk, the longest lengths."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

from chunkwise.plan.compute import StepFlops, check_documents, step_flops
from chunkwise.plan.fit import AUTO_MARGIN, Budget, largest_fitting, longest_length
from chunkwise.plan.memory import METHODS, MethodPlan, plan_memory
from chunkwise.plan.shape import DERIVED_TYPES, ModelShape, PlanError, Training


@dataclass
class PlanReport:
    """What `chunkwise plan` prints.

    Attributes:
        shape, training: the model and how it trains.
        seq_len: the length of the breakdown (None: only the longest lengths were asked for).
        plans: each method's plan at `seq_len`.
        budget: the memory the answer is for (None: no --memory and no such device here).
        recommended: the plan `--chunk-size auto` would pick (seco, else seco+offload), or None.
        longest: each method's plan at the longest length within `budget`.
        notes: caveats (approximate architecture, position limit, ...).
        documents: the packed row's document lengths (None: one stream per row).
        flops: each method's step FLOPs at `seq_len` (`chunkwise.plan.compute`), with `documents` if given.
        cross_flops: the same row without document boundaries (None for one stream): what per-document attention saves.
    """

    shape: ModelShape
    training: Training
    seq_len: int | None
    plans: list[MethodPlan]
    budget: Budget | None
    recommended: MethodPlan | None
    longest: dict[str, MethodPlan | None]
    notes: list[str]
    documents: tuple[int, ...] | None = None
    flops: list[StepFlops] = field(default_factory=list)
    cross_flops: list[StepFlops] | None = None

    def as_dict(self) -> dict:
        def plan_dict(plan: MethodPlan | None) -> dict | None:
            if plan is None:
                return None
            return {"method": plan.method, "seq_len": plan.seq_len, "chunk_size": plan.chunk_size, "peak_bytes": plan.peak,
                    "host_bytes": plan.host, "phase": plan.phase, "parts": plan.parts, "sizes": plan.sizes,
                    "fits": None if self.budget is None else self.budget.admits(plan, self.training.device_type)}

        budget = None if self.budget is None else {"free_bytes": self.budget.free, "usable_bytes": self.budget.usable,
                                                   "source": self.budget.source, "margin": AUTO_MARGIN}
        return {
            "model": {key: value for key, value in vars(self.shape).items() if key != "linears"},
            "training": {**_training_fields(self.training), "precision": self.training.precision},
            "seq_len": self.seq_len,
            "budget": budget,
            "methods": [plan_dict(plan) for plan in self.plans],
            "recommended": plan_dict(self.recommended),
            "longest": {method: plan_dict(plan) for method, plan in self.longest.items()},
            "notes": self.notes,
            "documents": None if self.documents is None else list(self.documents),
            "flops": [_flops_dict(f) for f in self.flops],
            "cross_document_flops": None if self.cross_flops is None else [_flops_dict(f) for f in self.cross_flops],
        }


def _flops_dict(flops: StepFlops) -> dict:
    return {"method": flops.method, "linear": flops.linear, "attention": flops.attention, "attention_share": flops.attention_share}


def _training_fields(training: Training) -> dict:
    """The training settings for JSON: a quantized base's settings as a dict, none for an unquantized one."""
    fields = {name: value for name, value in vars(training).items() if name != "quantization"}
    if training.quantization.enabled:
        fields["quantization"] = dataclasses.asdict(training.quantization)
    return fields


def build_report(shape: ModelShape, training: Training, *, seq_len: int | None, chunk_size: int | None,
                 budget: Budget | None, documents: tuple[int, ...] | None = None, spaco_budget: int = 8) -> PlanReport:
    """Plans at `seq_len` (with `chunk_size`, else the recommended chunk, else 1024) and, with a budget,
    the recommended chunk and each method's longest length.

    `documents`: the row is packed with documents of these lengths (their sum is the row; `seq_len` may be
    None then): the plans and FLOPs at `seq_len` are those of per-document attention, and the FLOPs of the
    same row with attention across documents come beside them. The recommended chunk and the longest
    lengths are those of rows of one document. `spaco_budget`: SpaCO's chunks per step, for its FLOPs.
    """
    if documents is not None:
        seq_len = sum(documents) if seq_len is None else seq_len
        check_documents(documents, seq_len)
    if seq_len is None and budget is None:
        raise PlanError("give --seq-len N (the breakdown at that length) or --memory SIZE (the longest length that fits)")
    if training.lora and not shape.lora_modules(training.lora_targets):
        raise PlanError(f"--lora-targets {','.join(training.lora_targets)} match no module of {shape.name}; "
                        f"its linear layers are named like {shape.linears[0][0]}")
    notes = []
    if not shape.derived:
        notes.append(f"{shape.model_type}: activations are estimated with the Llama layer (derived for "
                     f"{', '.join(DERIVED_TYPES)}); expect a larger error")
    if training.device_type == "cuda":
        notes.append("CUDA: derived from the code paths, validated only on CPU so far (docs/plan.md)")
    recommended = None
    if seq_len is not None and shape.max_positions and seq_len > shape.max_positions:
        notes.append(f"{seq_len} tokens is above the model's position limit ({shape.max_positions}); "
                     "chunkwise train needs --allow-extrapolation")
    if seq_len is not None and budget is not None:
        recommended = (largest_fitting(shape, training, seq_len, budget, "seco")[0]
                       or largest_fitting(shape, training, seq_len, budget, "seco+offload")[0])
    plans, flops, cross = [], [], None
    if seq_len is not None:
        chunk = chunk_size or (recommended.chunk_size if recommended else min(1024, seq_len))
        plans = plan_memory(shape, training, seq_len=seq_len, chunk_size=chunk, documents=documents)
        flops = [step_flops(shape, plan.method, seq_len=seq_len, chunk_size=chunk, budget=spaco_budget, documents=documents) for plan in plans]
        if documents is not None:
            cross = [step_flops(shape, plan.method, seq_len=seq_len, chunk_size=chunk, budget=spaco_budget) for plan in plans]
    longest = {}
    if budget is not None:
        longest = {method: longest_length(shape, training, method, budget=budget, chunk_size=chunk_size) for method in METHODS}
    return PlanReport(shape, training, seq_len, plans, budget, recommended, longest, notes, documents, flops, cross)
