"""The memory model, from configs alone: model shapes, the traced layer, per-method memory, what fits.

    shape.py   ModelShape (sizes from a config), Training (what trains, in which precision), PlanError
    layers.py  what one decoder layer keeps for backward, traced op by op
    memory.py  each method's predicted peak (`method_plan`: one function per method), MethodPlan
    fit.py     Budget, the chunk `--chunk-size auto` picks (`auto_chunk_plan`, both entry points), the longest length
    report.py  `chunkwise plan`'s whole answer (`build_report`)

Callers above this layer (`chunkwise plan`, `chunkwise train --chunk-size auto`, `ChunkwiseConfig(chunk_size="auto")`)
import the planner's names from here, not from its modules.
"""

from chunkwise.plan.fit import (
    AUTO_MARGIN,
    LONGEST_SEARCH_LIMIT,
    MIN_AUTO_CHUNK,
    Budget,
    auto_chunk_plan,
    device_budget,
    fit_chunk_size,
    longest_length,
    plan_training_step,
)
from chunkwise.plan.memory import METHODS, MethodPlan, describe_parts, method_plan, plan_memory
from chunkwise.plan.report import PlanReport, build_report
from chunkwise.plan.shape import ModelShape, PlanError, Training

__all__ = ["AUTO_MARGIN", "LONGEST_SEARCH_LIMIT", "METHODS", "MIN_AUTO_CHUNK", "Budget", "MethodPlan", "ModelShape", "PlanError",
           "PlanReport", "Training", "auto_chunk_plan", "build_report", "describe_parts", "device_budget", "fit_chunk_size",
           "longest_length", "method_plan", "plan_memory", "plan_training_step"]
