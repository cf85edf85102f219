"""How biased is SpaCO's gradient estimate? Exact expectations by enumerating every chunk selection.

    .venv/bin/python docs/spaco_bias.py

For a tiny Llama (float64) and one sequence of k chunks, the SpaCO estimate g_S for a selection S of
chunks is computed by the engine itself (a sampler that always returns S). Each policy's expectation
is then an exact weighted sum over selections, no sampling noise:

    uniform   (the paper): E[g_hat] = mean of g_S over the C(k, t) subsets of size t
    bernoulli (ours):      E[g_hat] = sum over all 2^k subsets of q^|S| (1-q)^(k-|S|) g_S,  q = t/k

and compared with the exact gradient g (SeCO). The estimate for S depends only on S and the
compensation factor f, so g_S is computed once per (S, f) and shared between the rows.

Note on precision: transformers' LlamaRMSNorm computes in float32 even in a float64 model. Compensation
scales the gradients that flow through the norms by f, and float32 rounding does not commute with that
scaling, which would leave a ~1e-7 residual even in exactly unbiased rows. The norms are therefore run in
the model's dtype here (same formula), so every number below is the policy's own bias.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import torch

from chunkwise import SeCO, SpaCO
from chunkwise.models.presets import build_tiny_model
from chunkwise.recipes.verify import compute_norms_in_model_dtype  # the float64 RMSNorms `chunkwise verify` uses

# The tests' FixedSelection (tests/spaco_reference.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spaco_reference import FixedSelection  # noqa: E402

SEQ_LEN = 64
CHUNK_SIZE = 8  # k = 8 chunks: 2^8 = 256 selections per compensation factor
BUDGETS = (2, 4, 6)
CAP = 2.0  # the paper's max_compensation


def gradient(model, engine, input_ids) -> torch.Tensor:
    """All trainable gradients of one engine step, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    engine.backward(input_ids)
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
        for p in model.parameters() if p.requires_grad
    ])


def main() -> None:
    model = build_tiny_model("tiny-llama", dtype=torch.float64, seed=0)
    compute_norms_in_model_dtype(model)
    input_ids = torch.randint(0, model.config.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    k = math.ceil(SEQ_LEN / CHUNK_SIZE)
    exact = gradient(model, SeCO(model, chunk_size=CHUNK_SIZE), input_ids)

    memo: dict[tuple, torch.Tensor] = {}

    def estimate(chunks, budget, cap):
        """SpaCO's gradient for the selection `chunks` with the factor of (budget, cap)."""
        factor = k / budget if cap is None else min(k / budget, cap)
        if (chunks, factor) not in memo:
            sampler = FixedSelection(chunks, budget=budget, max_compensation=cap)
            memo[chunks, factor] = gradient(model, SpaCO(model, chunk_size=CHUNK_SIZE, budget=budget, sampling=sampler), input_ids)
        return memo[chunks, factor]

    def uniform(budget, cap):
        subsets = list(itertools.combinations(range(k), budget))
        return sum(estimate(s, budget, cap) for s in subsets) / len(subsets)

    def bernoulli(budget, cap):
        q = budget / k
        return sum(
            q ** len(s) * (1 - q) ** (k - len(s)) * estimate(s, budget, cap)
            for size in range(k + 1)
            for s in itertools.combinations(range(k), size)
        )

    rows = [("uniform", budget, None, uniform) for budget in BUDGETS]
    rows += [("uniform", budget, CAP, uniform) for budget in BUDGETS]
    rows += [("bernoulli", budget, None, bernoulli) for budget in BUDGETS]
    rows += [("bernoulli", 2, CAP, bernoulli)]  # a cap below k/t biases bernoulli too

    start = time.perf_counter()
    print(f"tiny-llama (float64), {SEQ_LEN} tokens, chunk_size {CHUNK_SIZE}: k = {k} chunks; exact expectations over all selections\n")
    print("| policy | budget t | max_compensation | factor | relative bias ‖E[ĝ] − g‖ / ‖g‖ | cosine(E[ĝ], g) |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy, budget, cap, expectation in rows:
        mean = expectation(budget, cap)
        factor = k / budget if cap is None else min(k / budget, cap)
        bias = ((mean - exact).norm() / exact.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(mean, exact, dim=0).item()
        print(f"| {policy} | {budget} | {'none' if cap is None else cap} | {factor:.3g} | {bias:.2e} | {cosine:.6f} |")
    print(f"\n{len(memo)} engine steps, {time.perf_counter() - start:.0f} s. "
          "Bias is the L2 norm over all parameters; bernoulli without a cap is unbiased up to float64 rounding.")


if __name__ == "__main__":
    main()
