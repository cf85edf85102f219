"""What SpaCO's estimates are compared against: the exact expectation over every selection of chunks.

With k chunks, each possible selection S is run through the engine by a sampler that always returns S
(`FixedSelection`), and the probability-weighted sum of the estimates is E[g_hat] (`expected_gradient`
over `bernoulli_selections` or `uniform_selections`): test_spaco, test_objectives.
"""

from __future__ import annotations

import itertools
import math

from chunkwise import ChunkSampler


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
