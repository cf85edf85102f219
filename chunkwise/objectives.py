"""Public path of the training objectives (`chunkwise.core.objectives`): cross-entropy, DPO, IPO, SimPO, GRPO."""

from chunkwise.core.objectives import *  # noqa: F401,F403
from chunkwise.core.objectives import __all__  # noqa: F401
