"""The names of the engine's choices a user gives (`--method`, `--sampling`, `--objective`), without the classes behind
them: the command line checks its options against these before torch is imported. `chunkwise.core.sampling.SAMPLERS`
and `chunkwise.core.objectives.OBJECTIVES` map the same names to their classes (a test keeps the two in step).
"""

METHODS = ("seco", "spaco")
"""The chunk-wise engines: SeCO (exact) and SpaCO (sampled chunks)."""
SAMPLING_POLICIES = ("uniform", "bernoulli", "adaptive")
"""SpaCO's chunk selection policies (`chunkwise.core.sampling`)."""
OBJECTIVE_NAMES = ("cross-entropy", "dpo", "ipo", "simpo")
"""The objectives `chunkwise train --objective` names (`chunkwise.core.objectives.OBJECTIVES`)."""
