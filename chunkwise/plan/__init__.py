"""The memory model, from configs alone: model shapes, the traced layer, per-method memory, what fits.

Callers above this layer (`chunkwise plan`, `chunkwise train --chunk-size auto`, `ChunkwiseConfig(chunk_size="auto")`)
import the planner's names from here, not from its modules.
"""

from chunkwise.plan.memory import (
    LONGEST_SEARCH_LIMIT,
    Budget,
    ModelShape,
    PlanError,
    Training,
    build_report,
    describe_parts,
    device_budget,
    fit_chunk_size,
    plan_training_step,
)

__all__ = ["LONGEST_SEARCH_LIMIT", "Budget", "ModelShape", "PlanError", "Training", "build_report", "describe_parts",
           "device_budget", "fit_chunk_size", "plan_training_step"]
