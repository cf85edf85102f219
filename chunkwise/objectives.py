"""Public path of the training objectives (`chunkwise.core.objectives`)."""

from chunkwise.core.objectives import (
    DPO,
    GRPO,
    IPO,
    OBJECTIVES,
    BoundObjective,
    CrossEntropy,
    Objective,
    PairedLoss,
    Policy,
    SequenceLoss,
    SimPO,
    TokenLoss,
)

__all__ = ["Objective", "BoundObjective", "Policy", "CrossEntropy", "TokenLoss", "SequenceLoss", "PairedLoss", "DPO", "IPO",
           "SimPO", "GRPO", "OBJECTIVES"]
