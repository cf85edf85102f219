"""`adaptive`: chunk decisions made in stage 2, exactly unbiased, within the budget on average.

The exact checks enumerate every decision path. `adaptive`'s q at a chunk depends on the relay, i.e. on the
decisions made before it, so the paths are walked depth-first: a run follows a forced prefix of decisions and
drops every chunk after it, reporting the q it used at each chunk; each decision point past the prefix then
spawns the path that keeps it. A path's probability is the product of q (kept) or 1 - q (dropped) over its
decision points (chunks with q = 0 or 1 are not decisions); the probability-weighted sum of the paths'
gradients is E[g_hat], which must equal SeCO's gradient to float64 rounding.

The tiny models' RMSNorms compute in the model's dtype here (as in tests/core/test_spaco.py, whose module
docstring says why): otherwise float32 rounding inside the norms hides the 1e-10 claim.
"""

from __future__ import annotations

import pytest
import torch
from reference import max_relative_error, trainable_grads
from spaco_reference import CHUNK, batch, float64_model, seco_grads

from chunkwise import SeCO, SpaCO
from chunkwise.core.sampling import SAMPLERS, AdaptivePlan, AdaptiveSampler
from chunkwise.objectives import DPO, GRPO

K, BUDGET = 5, 2  # 5 chunks of CHUNK = 4 tokens (SEQ = 18: the last one ragged, 2 tokens), budget 2
ARCHITECTURES = ("tiny-llama", "tiny-qwen3", "tiny-mistral")


class ForcedPlan(AdaptivePlan):
    """Takes its decisions from `forced` (then drops), and records each decision point's q."""

    forced: list[bool] = []

    def _keep(self, chunk, q, draw):
        decisions = [kept for _, p, kept in self.trace if 0 < p < 1]
        return self.forced[len(decisions)] if len(decisions) < len(self.forced) else False


def forced_engine(model, forced: list[bool], *, budget: int = BUDGET, chunk_size: int = CHUNK, sampler_options=None) -> SpaCO:
    plan_class = type("Forced", (ForcedPlan,), {"forced": forced})
    sampler = AdaptiveSampler(budget=budget, seed=0, **(sampler_options or {}))
    sampler.plan_class = plan_class
    return SpaCO(model, chunk_size=chunk_size, sampling=sampler)


def expectation_over_paths(model, input_ids, labels, *, budget: int = BUDGET, chunk_size: int = CHUNK,
                           sampler_options=None, **options):
    """E[g_hat] and E[chunks backpropagated] over every decision path, and the number of paths."""
    expected_grads, expected_chunks, paths = None, 0.0, 0
    stack: list[list[bool]] = [[]]
    while stack:
        prefix = stack.pop()
        engine = forced_engine(model, prefix, budget=budget, chunk_size=chunk_size, sampler_options=sampler_options)
        model.zero_grad(set_to_none=True)
        out = engine.backward(input_ids, labels=labels, **{k: v() if callable(v) else v for k, v in options.items()})
        points = [(q, kept) for _, q, kept in engine.sampler.last_plan.trace if 0 < q < 1]
        decisions = [kept for _, kept in points]
        assert decisions[: len(prefix)] == prefix
        stack.extend(decisions[:i] + [True] for i in range(len(prefix), len(points)))
        probability = 1.0
        for q, kept in points:
            probability *= q if kept else 1 - q
        grads = trainable_grads(model)
        weighted = {name: probability * g for name, g in grads.items()}
        expected_grads = weighted if expected_grads is None else {n: expected_grads[n] + weighted[n] for n in weighted}
        expected_chunks += probability * len(out.selected)
        paths += 1
    return expected_grads, expected_chunks, paths


@pytest.mark.parametrize("preset", ARCHITECTURES)
@pytest.mark.parametrize("where", ["last", "everywhere"])
def test_every_decision_path_weighted_is_seco(preset, where):
    model = float64_model(preset)
    input_ids, labels = batch(where)
    expected, chunks, paths = expectation_over_paths(model, input_ids, labels)
    exact = seco_grads(model, input_ids, labels)
    # Measured: <= 1.2e-15 (float64 rounding; 11-32 paths); a wrong factor or a q the draw does not use is off by O(1).
    assert max_relative_error(expected, exact) < 1e-10
    assert chunks <= BUDGET + 1e-12  # docs/spaco.md: sum of q over a path <= t on every path
    assert paths > 2  # the relay made it choose; a policy that never decides would prove nothing here


def first_path_qs(model, input_ids, labels, **sampler_options) -> list[tuple[int, float, bool]]:
    """The (chunk, q, kept) trace of the path that keeps every decision point: each q there depends on the relay."""
    engine = forced_engine(model, [True] * K, sampler_options=sampler_options)
    model.zero_grad(set_to_none=True)
    engine.backward(input_ids, labels=labels)
    return engine.sampler.last_plan.trace


@pytest.mark.parametrize("where", ["last", "everywhere"])
def test_carried_weight_is_unbiased_and_within_the_budget(where):
    """carried_weight = λ < 1 (the relay's share of the visited loss scored λ times): every decision path weighted
    is still SeCO's gradient, and at most t chunks on average."""
    model = float64_model("tiny-llama")
    input_ids, labels = batch(where)
    expected, chunks, paths = expectation_over_paths(model, input_ids, labels, sampler_options={"carried_weight": 0.25})
    # Measured: ~1e-15 (float64 rounding), as for the default.
    assert max_relative_error(expected, seco_grads(model, input_ids, labels)) < 1e-10
    assert chunks <= BUDGET + 1e-12 and paths > 2


def test_carried_weight_changes_nothing_where_targets_are_at_the_end_and_evens_q_where_everywhere():
    """Targets in the last chunk only: the chunks before it are scored by the relay alone, so λ cancels in the split
    (the same q, to rounding). Targets on every token: their own targets weigh more than the relay's uneven norms,
    so the full chunks' q (the last one is ragged) are closer to each other."""
    model = float64_model("tiny-llama")
    last = batch("last")
    default, weighted = first_path_qs(model, *last), first_path_qs(model, *last, carried_weight=0.25)
    assert [(c, kept) for c, _, kept in weighted] == [(c, kept) for c, _, kept in default]
    assert all(abs(q - p) < 1e-12 for (_, q, _), (_, p, _) in zip(weighted, default))
    everywhere = batch("everywhere")
    spread = lambda trace: max(q for c, q, _ in trace if c < K - 1) - min(q for c, q, _ in trace if c < K - 1)
    # Measured: 6.3e-5 against 1.9e-4 (the tiny model's relay is nearly even).
    assert spread(first_path_qs(model, *everywhere, carried_weight=0.25)) < 0.5 * spread(first_path_qs(model, *everywhere))


def preference_rows():
    """4 right-padded prompt + response rows of up to 24 tokens (rows 0-1 chosen, 2-3 rejected, shared prompts)."""
    generator = torch.Generator().manual_seed(5)
    prompts, responses = [7, 5, 7, 5], [15, 17, 12, 9]
    ids = torch.zeros(4, 22, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, : p + r] = torch.randint(1, 128, (p + r,), generator=generator)
        mask[row, : p + r] = 1
        labels[row, p : p + r] = ids[row, p : p + r]
    ids[2, :7], ids[3, :5] = ids[0, :7], ids[1, :5]
    return ids, mask, labels


@pytest.mark.parametrize("name", ["grpo", "dpo"])
def test_objectives_token_and_sequence_level_are_unbiased(name):
    """GRPO (token-local) and DPO (sequence-level: stage 1 collects its statistics) under `adaptive`: every
    decision path weighted is SeCO's gradient."""
    model = float64_model("tiny-llama")
    ids, mask, labels = preference_rows()
    advantages = torch.tensor([0.9, -1.1, 0.3, 0.5], dtype=torch.float64)
    old = torch.full(ids.shape, -4.0, dtype=torch.float64)
    make = {"grpo": lambda: GRPO(advantages=advantages, old_logps=old, normalization="token"),
            "dpo": lambda: DPO(beta=0.1, reference=torch.tensor([-80.0, -85.0, -60.0, -50.0], dtype=torch.float64))}[name]
    model.zero_grad(set_to_none=True)
    SeCO(model, chunk_size=6).backward(ids, labels=labels, attention_mask=mask, objective=make())
    exact = trainable_grads(model)
    expected, chunks, paths = expectation_over_paths(model, ids, labels, chunk_size=6, attention_mask=mask, objective=make)
    # Measured: ~1e-15 (float64 rounding).
    assert max_relative_error(expected, exact) < 1e-10
    assert chunks <= BUDGET + 1e-12 and paths > 2


def test_targets_in_the_last_chunk_are_never_dropped():
    """Targets only in the last chunk: q = 1 there, so no step has a zero gradient."""
    model = float64_model("tiny-llama")
    input_ids, labels = batch("last")
    engine = SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", seed=3)
    for _ in range(20):
        model.zero_grad(set_to_none=True)
        out = engine.backward(input_ids, labels=labels)
        assert K - 1 in out.selected
        assert engine.sampler.last_plan.trace[0] == (K - 1, 1.0, True)


@pytest.mark.parametrize("budget", [K, K + 3])
def test_full_budget_is_seco_bit_for_bit(budget):
    model = float64_model("tiny-llama")
    input_ids, labels = batch("everywhere")
    exact = seco_grads(model, input_ids, labels)
    model.zero_grad(set_to_none=True)
    out = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling="adaptive").backward(input_ids, labels=labels)
    assert out.selected == tuple(range(K)) and out.factors == (1.0,) * K
    grads = trainable_grads(model)
    assert all(torch.equal(grads[name], exact[name]) for name in exact)


def decisions(engine, model, input_ids, labels, steps):
    seen = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = engine.backward(input_ids, labels=labels)
        seen.append((out.selected, out.factors))
    return seen


@pytest.mark.parametrize("stratify", [True, False])
def test_state_dict_replays_the_decisions(stratify):
    model = float64_model("tiny-llama")
    input_ids, labels = batch("everywhere")
    make = lambda: SpaCO(model, chunk_size=CHUNK, sampling=AdaptiveSampler(budget=BUDGET, seed=5, stratify=stratify))
    engine = make()
    decisions(engine, model, input_ids, labels, 3)
    saved = engine.state_dict()
    after = decisions(engine, model, input_ids, labels, 4)
    resumed = make()
    resumed.load_state_dict(saved)
    assert decisions(resumed, model, input_ids, labels, 4) == after
    assert len({selected for selected, _ in after}) > 1  # it does decide


def test_stratified_draws_are_uniform_and_spread():
    """Each chunk's stratified draw steps by the golden ratio: over 1000 steps any interval [0, q) holds
    q * 1000 draws to within a few (an i.i.d. stream would be off by ~sqrt(q (1 - q) 1000) ~ 14 at q = 0.3)."""
    sampler = AdaptiveSampler(budget=1, seed=0)
    draws = torch.stack([sampler._draws(4) for _ in range(1000)])
    assert draws.min() >= 0 and draws.max() < 1
    for q in (0.1, 0.3, 0.5):
        counts = (draws < q).sum(0)
        assert ((counts - 1000 * q).abs() <= 3).all(), counts


def test_offload_decides_and_computes_alike():
    model = float64_model("tiny-llama")
    input_ids, labels = batch("everywhere")
    runs = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        engine = SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", seed=2, offload_kv=offload)
        out = engine.backward(input_ids, labels=labels)
        runs.append((out.selected, out.factors, out.loss, trainable_grads(model)))
    (sel, fac, loss, grads), (sel_o, fac_o, loss_o, grads_o) = runs
    assert (sel, fac) == (sel_o, fac_o)
    torch.testing.assert_close(loss_o, loss, rtol=1e-12, atol=0)
    assert max_relative_error(grads_o, grads) < 1e-12


def test_full_loss_is_exact_whichever_chunks_stage_2_drops():
    """full_loss=True: every chunk's loss (stage 1 runs the head on chunks with targets, stage 2 scores a dropped
    last chunk)."""
    model = float64_model("tiny-llama")
    input_ids, labels = batch("everywhere")
    model.zero_grad(set_to_none=True)
    exact = SeCO(model, chunk_size=CHUNK).backward(input_ids, labels=labels).loss
    exact_engine = SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive")
    estimating = SpaCO(model, chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", full_loss=False)
    last_dropped = 0
    for _ in range(8):
        model.zero_grad(set_to_none=True)
        out = exact_engine.backward(input_ids, labels=labels)
        torch.testing.assert_close(out.loss, exact, rtol=1e-13, atol=0)
        last_dropped += K - 1 not in out.selected  # then stage 2 scored it (stage 1 does not run the last chunk)
        model.zero_grad(set_to_none=True)
        out = estimating.backward(input_ids, labels=labels)
        assert out.selected == tuple(sorted(out.selected)) and len(out.factors) == len(out.selected)
    assert last_dropped > 0


@pytest.mark.parametrize("options, message", [
    ({"budget": 2, "max_compensation": 2.0}, "leave max_compensation unset"),
    ({"budget": 2, "floor": 0.0}, "floor must be in (0, 1]"),
    ({"budget": 2, "carried_weight": 0.0}, "carried_weight must be in (0, 1]"),
    ({"budget": 0}, "budget must be a positive integer"),
])
def test_bad_options_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        AdaptiveSampler(**options)


def test_registered_for_the_config_and_the_cli():
    assert "adaptive" in SAMPLERS


def test_chunkwise_config_builds_it_and_refuses_a_cap():
    from chunkwise import ChunkwiseConfig

    engine = ChunkwiseConfig(method="spaco", chunk_size=CHUNK, budget=BUDGET, sampling="adaptive").make_engine(float64_model("tiny-llama"))
    assert isinstance(engine.sampler, AdaptiveSampler) and engine.sampler.budget == BUDGET
    with pytest.raises(ValueError, match="leave max_compensation unset"):
        ChunkwiseConfig(method="spaco", chunk_size=CHUNK, budget=BUDGET, sampling="adaptive", max_compensation=2.0)
