"""Training objectives: what each chunk backpropagates (DESIGN.md §3, "Growing the house").

An objective tells the engine two things: what stage 1 must collect (nothing, or every chunk's
logits), and what chunk j backpropagates in stage 2 (a scalar built from chunk j's logits alone).
Two families are exactly decomposable that way:

* **Token-local** (`CrossEntropy`, `TokenLoss`, `GRPO`): L = Σ_{b,t} c_{b,t} · ℓ(log p_{b,t}, extras_{b,t})
  over the valid targets, with weights c (the normalisation) fixed before any model call. Chunk j
  backpropagates its own tokens' terms; their sum over chunks is L. Stage 1 collects nothing.
* **Sequence-level** (`SequenceLoss`, `DPO`, `IPO`, `SimPO`): L = f(s_1, …, s_N) where s_b = Σ_t log p_{b,t}
  is row b's summed target log-probability. Stage 1 (no autograd) runs the LM head on every chunk and
  adds up each s_b; then w_b = ∂L/∂s_b (autograd through f on N scalars). Chunk j backpropagates
  Σ_b w_b Σ_{t in chunk j} log p_{b,t}; summed over the chunks its gradient is Σ_b w_b ∇s_b = ∇L, exactly.

Reference log-probs (DPO, IPO, GRPO's KL term) come precomputed as tensors, or from a no-grad chunked
pass of a reference model run before stage 1 (`chunkwise.core.reference`).

**SpaCO.** Token-local objectives are compensated like cross-entropy: `bernoulli` stays exactly unbiased,
`uniform` keeps its small bias for long dependency chains. For sequence-level objectives stage 1 still
visits every chunk (with the LM head: SpaCO's stage 1 costs a full forward here), so L and the weights
w_b are exact; SpaCO then samples the chunks of the token-local sum Σ_b w_b Σ_t log p_{b,t}, so
`bernoulli` is an exactly unbiased estimate of ∇L (given the exact w_b) and `uniform` has the same bias
as for cross-entropy. The reported loss is the exact L either way.

Per-token tensors (advantages, old log-probs, reference log-probs, …) are `[B, T]` *aligned with the
labels*: entry t belongs to the token `labels[:, t]` names (the prediction made at position t-1), so
they are shifted and cut into chunks together with the labels. A per-row value may be given as `[B]`.

Every check runs when the objective is bound to a batch, before any model call.
"""

from chunkwise.core.objectives.base import BoundCrossEntropy, BoundObjective, CrossEntropy, Objective, Policy
from chunkwise.core.objectives.sequence import DPO, IPO, PairedLoss, SequenceLoss, SimPO
from chunkwise.core.objectives.token import GRPO, NORMALIZATIONS, TokenLoss, grpo_token_loss

OBJECTIVES = {"cross-entropy": CrossEntropy, "dpo": DPO, "ipo": IPO, "simpo": SimPO}
"""The objectives `chunkwise train --objective` names."""

__all__ = ["Objective", "BoundObjective", "Policy", "CrossEntropy", "BoundCrossEntropy", "TokenLoss", "GRPO", "grpo_token_loss",
           "NORMALIZATIONS", "SequenceLoss", "PairedLoss", "DPO", "IPO", "SimPO", "OBJECTIVES"]
