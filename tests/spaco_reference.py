"""What SpaCO's estimates are compared against: the exact expectation over every selection of chunks.

With k chunks, each possible selection S is run through the engine by a sampler that always returns S
(`FixedSelection`), and the probability-weighted sum of the estimates is E[g_hat] (`expected_gradient`
over `bernoulli_selections` or `uniform_selections`): test_spaco, test_objectives.
"""

from __future__ import annotations

import itertools
import math

import torch
from reference import trainable_grads
from tiny_models import norms_in_model_dtype

from chunkwise import ChunkSampler, SeCO
from chunkwise.models.presets import build_tiny_model


class FixedSelection(ChunkSampler):
    """Always selects `chunks`. The factor is the base class's: k / budget, capped by max_compensation."""

    name = "fixed"

    def __init__(self, chunks, *, budget, max_compensation=None):
        super().__init__(budget=budget, max_compensation=max_compensation)
        self.chunks = tuple(chunks)

    def _draw(self, num_chunks):
        return self.chunks


def bernoulli_selections(num_chunks, budget):
    """Every selection of the `num_chunks` chunks with its probability when each is kept with q = budget / k."""
    q = budget / num_chunks
    for size in range(num_chunks + 1):
        for chunks in itertools.combinations(range(num_chunks), size):
            yield chunks, q**size * (1 - q) ** (num_chunks - size)


def uniform_selections(num_chunks, budget):
    """Every selection of exactly `budget` of the `num_chunks` chunks, each with probability 1 / C(k, budget)."""
    weight = 1 / math.comb(num_chunks, budget)
    for chunks in itertools.combinations(range(num_chunks), budget):
        yield chunks, weight


def expected_gradient(gradient, subsets_and_weights):
    """Sum of weight * gradient(chunks) over an enumeration of (chunks, weight), per parameter."""
    total = {}
    for chunks, weight in subsets_and_weights:
        for name, grad in gradient(chunks).items():
            total[name] = total.get(name, 0) + weight * grad
    return total


# ----- the adaptive policy's tiny setting (tests/core/test_adaptive.py, docs/spaco_adaptive.py) -----------

CHUNK, SEQ = 4, 18  # 5 chunks, the last one ragged (2 tokens)


def float64_model(preset: str) -> torch.nn.Module:
    """A float64 tiny model whose RMSNorms compute in float64 (see `tiny_models.norms_in_model_dtype`)."""
    return norms_in_model_dtype(build_tiny_model(preset, dtype=torch.float64, seed=0))


def batch(where: str):
    """Two rows of `SEQ` tokens; labels on the last token only (its target sits in the last chunk) or everywhere."""
    input_ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    if where == "last":
        labels[:, : SEQ - 1] = -100
    return input_ids, labels


def seco_grads(model, input_ids, labels):
    """SeCO's (exact) gradient of the batch, chunk `CHUNK`."""
    model.zero_grad(set_to_none=True)
    SeCO(model, chunk_size=CHUNK).backward(input_ids, labels=labels)
    return trainable_grads(model)

