"""SpaCO: which chunks it backpropagates, how it compensates, and what its gradient equals on average.

The statistical claims of DESIGN.md §2 are checked two ways:

* exactly, by enumeration: with k = 6 chunks every possible selection S is run through the engine (a
  sampler that always returns S), and the probability-weighted sum of the estimates is E[g_hat]. For
  `bernoulli` it must equal the SeCO gradient to float64 rounding; for `uniform` (the paper's policy) it
  must not — the test pins the size of that bias.
* by Monte Carlo through the real sampler, with tolerances from the samples' own standard error, and a
  check that the same test catches a deliberately biased estimator.

Why the model's RMSNorms are patched: transformers' `LlamaRMSNorm` casts its input to float32 (it is
written for half-precision models), so a "float64" tiny Llama still rounds to float32 inside every
norm, forward and backward. SeCO vs full backprop is unaffected (the same per-token rounding happens in
both), but compensation multiplies the gradients flowing through the norms by k/t, and float32
rounding of 3·x is not 3·(rounding of x): the enumerated E[g_hat] then differs from the true gradient
by ~1e-7 relative (measured max_relative_error 1.2e-7), which would hide the 1e-10 claim. `norms_in_model_dtype`
(tests/tiny_models.py) makes the norms compute
in the model's dtype (same formula), so the model is float64 throughout and exact identities hold to
~1e-15.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from reference import chunk_by_chunk_backward, engine_backward, flat, max_relative_error, relative_l2, trainable_grads
from spaco_reference import FixedSelection, bernoulli_selections, expected_gradient, uniform_selections
from tiny_models import norms_in_model_dtype, random_ids

from chunkwise import BernoulliSampler, ChunkSampler, SeCO, SpaCO, UniformSampler
from chunkwise.core.loss import chunk_loss_sum, shift_labels
from chunkwise.models.presets import build_tiny_model

CHUNK = 4
SEQ = 22  # 6 chunks, the last one ragged (2 tokens)
K = 6


# ----- helpers ----------------------------------------------------------------------------------------


def assert_identical(grads: dict, reference: dict) -> None:
    assert grads.keys() == reference.keys()
    for name in reference:
        assert torch.equal(grads[name], reference[name]), name


# ----- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return norms_in_model_dtype(build_tiny_model("tiny-llama", dtype=torch.float64, seed=0))


@pytest.fixture(scope="module")
def input_ids():
    return random_ids(1, SEQ)


@pytest.fixture(scope="module")
def seco(model, input_ids):
    """The exact gradient: (output, grads) of SeCO on `input_ids`."""
    return engine_backward(model, SeCO(model, chunk_size=CHUNK), input_ids)


# ----- 1. budget >= k is SeCO -------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
@pytest.mark.parametrize("budget, max_compensation", [(K, None), (K + 3, None), (K + 3, 2.0)])
def test_full_budget_is_seco_exactly(model, input_ids, seco, sampling, budget, max_compensation):
    seco_out, seco_grads = seco
    engine = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling=sampling, max_compensation=max_compensation)
    out, grads = engine_backward(model, engine, input_ids)
    assert out.selected == tuple(range(K))
    assert out.compensation == 1.0
    assert out.num_chunks == K
    assert torch.equal(out.loss, seco_out.loss)
    assert_identical(grads, seco_grads)


# ----- 2. selection sizes and compensation ------------------------------------------------------------


def test_uniform_selects_exactly_budget_chunks(model, input_ids):
    budget, draws = 2, 3000
    engine = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling="uniform", seed=0)
    for _ in range(10):  # through the engine ...
        out, _ = engine_backward(model, engine, input_ids)
        assert len(out.selected) == budget and out.compensation == K / budget

    sampler = UniformSampler(budget=budget, seed=0)  # ... and many draws from the sampler
    counts = torch.zeros(K)
    subsets = set()
    for _ in range(draws):
        selection = sampler.select(K)
        chunks = selection.chunks
        assert len(chunks) == budget
        assert list(chunks) == sorted(set(chunks))  # distinct and ascending
        assert all(0 <= c < K for c in chunks)
        assert selection.compensation == K / budget
        counts[list(chunks)] += 1
        subsets.add(chunks)
    # Uniform: each chunk is in a draw with probability budget / k, and every subset occurs.
    p = budget / K
    assert (counts / draws - p).abs().max() < 4.5 * math.sqrt(p * (1 - p) / draws)
    assert len(subsets) == math.comb(K, budget)


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
@pytest.mark.parametrize("max_compensation, expected", [(None, 3.0), (2.0, 2.0), (3.0, 3.0), (10.0, 3.0), (1.0, 1.0)])
def test_compensation_is_k_over_budget_capped(model, input_ids, sampling, max_compensation, expected):
    engine = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, max_compensation=max_compensation)
    out, _ = engine_backward(model, engine, input_ids)
    assert out.compensation == expected  # k / budget = 6 / 2 = 3


def test_bernoulli_selection_size_varies_around_budget():
    budget, draws = 2, 4000
    q = budget / K
    sampler = BernoulliSampler(budget=budget, seed=0)
    sizes, counts = [], torch.zeros(K)
    for _ in range(draws):
        selection = sampler.select(K)
        assert list(selection.chunks) == sorted(set(selection.chunks))
        assert all(0 <= c < K for c in selection.chunks)
        assert selection.compensation == K / budget  # 1/q whatever the size drawn
        sizes.append(len(selection.chunks))
        counts[list(selection.chunks)] += 1
    sizes = torch.tensor(sizes, dtype=torch.float64)
    # |S| ~ Binomial(k, q): mean = budget, variance k q (1 - q).
    assert abs(sizes.mean().item() - budget) < 4.5 * math.sqrt(K * q * (1 - q) / draws)
    assert sizes.min() == 0 and sizes.max() >= budget + 2  # it really varies, down to nothing
    assert (counts / draws - q).abs().max() < 4.5 * math.sqrt(q * (1 - q) / draws)


# ----- 3. reproducibility -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_same_seed_same_selections_and_gradients(model, input_ids, sampling):
    a = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=7)
    b = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=7)
    for _ in range(4):
        out_a, grads_a = engine_backward(model, a, input_ids)
        out_b, grads_b = engine_backward(model, b, input_ids)
        assert out_a.selected == out_b.selected
        assert torch.equal(out_a.loss, out_b.loss)
        assert_identical(grads_a, grads_b)


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_different_seed_different_selections(model, input_ids, sampling):
    selections = []
    for seed in (0, 1):
        engine = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=seed)
        selections.append([engine_backward(model, engine, input_ids)[0].selected for _ in range(5)])
    assert selections[0] != selections[1]


def test_selection_ignores_and_preserves_global_rng(model, input_ids):
    selections = []
    for global_seed in (123, 456):
        engine = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="uniform", seed=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            before = torch.get_rng_state()
            selections.append([engine_backward(model, engine, input_ids)[0].selected for _ in range(3)])
            assert torch.equal(torch.get_rng_state(), before)  # the sampler has its own generator
    assert selections[0] == selections[1]


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_state_dict_replays_future_selections(model, input_ids, sampling):
    engine = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=5)
    for _ in range(3):
        engine_backward(model, engine, input_ids)
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)  # as a training checkpoint would
    future = [engine_backward(model, engine, input_ids)[0].selected for _ in range(5)]

    restored = SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=99)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    assert [engine_backward(model, restored, input_ids)[0].selected for _ in range(5)] == future


def test_loading_state_of_another_policy_raises(model):
    uniform = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="uniform")
    bernoulli = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="bernoulli")
    with pytest.raises(ValueError, match="policy"):
        bernoulli.load_state_dict(uniform.state_dict())


# ----- 4. exact expectations by enumeration -----------------------------------------------------------


@pytest.fixture(scope="module")
def subset_gradients(model):
    """Memoised SpaCO gradient of one forced selection: (labels case, chunks, budget) -> grads."""
    memo = {}

    def gradient(input_ids, labels, chunks, budget):
        key = (None if labels is None else tuple(labels.flatten().tolist()), tuple(chunks), budget)
        if key not in memo:
            engine = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling=FixedSelection(chunks, budget=budget))
            out, grads = engine_backward(model, engine, input_ids, labels=labels)
            assert out.selected == tuple(chunks) and out.compensation == K / budget
            memo[key] = grads
        return memo[key]

    return gradient


def _labels_with_a_targetless_chunk(input_ids):
    """Labels whose chunk 1 has no valid target (positions 3..7 predict ignored labels 4..8)."""
    labels = input_ids.clone()
    labels[:, 4:9] = -100
    return labels


@pytest.mark.parametrize(
    "budget, targetless_chunk",
    [(2, False), (4, False), (3, True)],
    ids=["t=2", "t=4", "t=3-chunk-without-targets"],
)
def test_bernoulli_is_exactly_unbiased(model, input_ids, subset_gradients, budget, targetless_chunk):
    labels = _labels_with_a_targetless_chunk(input_ids) if targetless_chunk else None
    _, exact = engine_backward(model, SeCO(model, chunk_size=CHUNK), input_ids, labels=labels)
    mean = expected_gradient(
        lambda chunks: subset_gradients(input_ids, labels, chunks, budget), bernoulli_selections(K, budget)
    )
    # Measured: 0.7e-15 to 1.4e-15 (float64 rounding). With transformers' float32 RMSNorms: ~1e-7.
    assert max_relative_error(mean, exact) < 1e-10


# Relative L2 bias ||E[g_hat] - g|| / ||g|| of `uniform` on this model and sequence (k = 6), measured by
# this enumeration: t=2: 0.174, t=4: 0.0467 (embeddings alone: 0.184, 0.0506). The thresholds are about
# half of that, and 1e13 times float64 rounding.
UNIFORM_BIAS_AT_LEAST = {2: 0.1, 4: 0.025}

# Parameters no KV cache depends on (the LM head, the final norm, the last layer's MLP) only get
# chunk-local gradient paths, which `uniform` compensates exactly; the bias lives in the KV relay.
RELAY_FREE = ("lm_head.", "model.norm.", "model.layers.1.mlp.")


@pytest.mark.parametrize("budget", sorted(UNIFORM_BIAS_AT_LEAST))
def test_uniform_is_biased(seco, input_ids, subset_gradients, budget):
    _, exact = seco
    mean = expected_gradient(
        lambda chunks: subset_gradients(input_ids, None, chunks, budget), uniform_selections(K, budget)
    )
    assert relative_l2(mean, exact) > UNIFORM_BIAS_AT_LEAST[budget]

    relay_free = [n for n in exact if n.startswith(RELAY_FREE)]
    assert len(relay_free) == 5
    # Measured: 1.2e-15 for both budgets.
    assert max_relative_error({n: mean[n] for n in relay_free}, {n: exact[n] for n in relay_free}) < 1e-10
    embeddings = "model.embed_tokens.weight"
    assert relative_l2({embeddings: mean[embeddings]}, {embeddings: exact[embeddings]}) > UNIFORM_BIAS_AT_LEAST[budget]


@pytest.mark.parametrize("chunk", [0, 3, K - 1])
def test_single_selected_chunk_is_compensated_local_gradient(model, input_ids, chunk):
    """With only chunk j selected, the estimate is k/t times J_j's gradient with the past held fixed."""
    budget = 2
    engine = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling=FixedSelection([chunk], budget=budget))
    out, grads = engine_backward(model, engine, input_ids)
    assert out.selected == (chunk,)

    _, local = chunk_by_chunk_backward(model, input_ids, chunk_size=CHUNK, local_chunk=chunk, scale=K / budget)
    assert max_relative_error(grads, local) < 1e-12  # measured: 0.0 (same operations)


# ----- 5. Monte Carlo through the real sampler --------------------------------------------------------

MC_SAMPLES = 400
MC_Z = 4.5


def _directions(exact: dict) -> torch.Tensor:
    """Fixed unit directions with a large true projection: the gradient, and the gradient restricted to
    the embeddings, each decoder layer and the LM head. (Seeded Gaussian directions were measured too:
    their true projections are so small that the standard error was up to 20% of them — weak tests.)"""
    g = flat(exact)

    def restricted(prefix):
        return torch.cat([(v if n.startswith(prefix) else torch.zeros_like(v)).flatten() for n, v in exact.items()])

    blocks = ["model.embed_tokens.", "model.layers.0.", "model.layers.1.", "lm_head."]
    directions = torch.stack([g] + [restricted(b) for b in blocks])
    return directions / directions.norm(dim=1, keepdim=True)


def _monte_carlo_z(model, input_ids, engine, directions, true_projection):
    """z-scores of the sample mean of the projected estimates, and their standard errors."""
    projections = torch.stack([directions @ flat(engine_backward(model, engine, input_ids)[1]) for _ in range(MC_SAMPLES)])
    standard_error = projections.std(dim=0) / math.sqrt(MC_SAMPLES)
    return (projections.mean(dim=0) - true_projection) / standard_error, standard_error


def test_bernoulli_monte_carlo_mean_converges_and_catches_bias(model, input_ids, seco):
    _, exact = seco
    directions = _directions(exact)
    true_projection = directions @ flat(exact)

    engine = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="bernoulli", seed=0)
    z, standard_error = _monte_carlo_z(model, input_ids, engine, directions, true_projection)
    # Measured z: [-0.51, -0.61, -0.69, -0.30, 0.06].
    assert z.abs().max() < MC_Z, z
    # Not vacuous: measured se / |projection| <= 0.064, so a bias of ~30% along any direction is caught.
    assert (standard_error / true_projection.abs()).max() < 0.1

    # The same test flags an estimator without compensation (E = paths weighted by q^(p+1), ~70% short).
    biased = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="bernoulli", max_compensation=1.0, seed=0)
    z_biased, _ = _monte_carlo_z(model, input_ids, biased, directions, true_projection)
    # Measured z: [-66.6, -66.7, -54.2, -65.7, -67.6].
    assert (z_biased.abs() > MC_Z).all(), z_biased


# ----- 6. loss reporting ------------------------------------------------------------------------------


def _padded_batch(input_ids):
    """Two right-padded rows (lengths 22 and 13) with -100 labels in the first row."""
    ids = torch.cat([input_ids, random_ids(1, SEQ, seed=1)])
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2:6] = -100
    return ids, {"attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("batch", ["single", "padded", "padded-num-items"])
def test_loss_covers_every_chunk(model, input_ids, batch):
    ids, kwargs = (input_ids, {}) if batch == "single" else _padded_batch(input_ids)
    if batch == "padded-num-items":
        kwargs["num_items"] = 50
    seco_out, _ = engine_backward(model, SeCO(model, chunk_size=CHUNK), ids, **kwargs)
    spaco = SpaCO(model, chunk_size=CHUNK, budget=2, sampling="uniform", seed=0)
    for _ in range(3):
        out, _ = engine_backward(model, spaco, ids, **kwargs)
        assert len(out.selected) == 2 < out.num_chunks == K
        assert out.num_targets == seco_out.num_targets
        # Same chunk losses, summed in a different order: equal up to float64 rounding.
        torch.testing.assert_close(out.loss, seco_out.loss, rtol=1e-13, atol=0)


def _seed_drawing_no_chunk(budget):
    for seed in range(100):
        if BernoulliSampler(budget=budget, seed=seed).select(K).chunks == ():
            return seed
    raise AssertionError("no seed in range(100) draws an empty first selection")  # P = (5/6)^6 each


def test_bernoulli_empty_selection_leaves_gradients_and_reports_loss(model, input_ids, seco):
    seco_out, _ = seco
    seed = _seed_drawing_no_chunk(budget=1)

    # Gradients already there (e.g. accumulated from an earlier micro-batch) stay exactly as they were.
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    before = trainable_grads(model)
    out = SpaCO(model, chunk_size=CHUNK, budget=1, sampling="bernoulli", seed=seed).backward(input_ids)
    assert out.selected == () and out.compensation == K and out.num_chunks == K
    assert_identical(trainable_grads(model), before)
    torch.testing.assert_close(out.loss, seco_out.loss, rtol=1e-13, atol=0)

    # From no gradients: still none.
    model.zero_grad(set_to_none=True)
    SpaCO(model, chunk_size=CHUNK, budget=1, sampling="bernoulli", seed=seed).backward(input_ids)
    assert all(p.grad is None for p in model.parameters())


# ----- 7. argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"budget": 0}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": 2, "sampling": "foo"}, "sampling"),
        ({"budget": 2, "max_compensation": 0.5}, "max_compensation"),
        ({"budget": 2, "max_compensation": float("nan")}, "max_compensation"),
        ({"budget": 2, "max_compensation": float("inf")}, "max_compensation"),
    ],
)
def test_invalid_arguments_raise(model, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SpaCO(model, chunk_size=CHUNK, **kwargs)


# ----- 8. custom samplers are held to the same contract ----------------------------------------------


@pytest.mark.parametrize("chunks", [(-1,), (3, 1), (1, 1), (7,), (5, 6)])
def test_custom_sampler_bad_selection_is_refused(model, input_ids, chunks):
    engine = SpaCO(model, chunk_size=CHUNK, sampling=FixedSelection(chunks, budget=2))
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"strictly ascending chunk indices in \[0, 6\)"):
        engine.backward(input_ids)
    assert all(p.grad is None for p in model.parameters())


def test_options_conflicting_with_a_sampler_instance_are_refused(model):
    with pytest.raises(ValueError, match="budget=3 conflicts with the sampler instance's budget=2"):
        SpaCO(model, chunk_size=CHUNK, budget=3, sampling=UniformSampler(budget=2))
    with pytest.raises(ValueError, match="seed=9 conflicts"):
        SpaCO(model, chunk_size=CHUNK, seed=9, sampling=UniformSampler(budget=2))
    with pytest.raises(ValueError, match="budget is required"):
        SpaCO(model, chunk_size=CHUNK, sampling="uniform")


def test_unnamed_custom_sampler_state_round_trips(model):
    class Unnamed(ChunkSampler):
        def _draw(self, num_chunks):
            return (0,)

    sampler = Unnamed(budget=1)
    sampler.load_state_dict(sampler.state_dict())
    assert sampler.state_dict()["policy"] == "Unnamed"
    with pytest.raises(ValueError, match="saved with budget 1"):
        Unnamed(budget=2).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_estimated_loss_skips_the_head_and_keeps_the_gradient(model, input_ids, sampling):
    """full_loss=False: stage 1 runs no LM head; same gradient; out.loss = factor x selected chunks' loss."""
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    try:
        full, full_grads = engine_backward(model, SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=3), input_ids)
        calls_full = len(head_calls)
        head_calls.clear()
        cheap, cheap_grads = engine_backward(
            model, SpaCO(model, chunk_size=CHUNK, budget=2, sampling=sampling, seed=3, full_loss=False), input_ids
        )
    finally:
        hook.remove()
    assert cheap.selected == full.selected and len(head_calls) == len(cheap.selected) < calls_full == K
    assert_identical(cheap_grads, full_grads)

    with torch.no_grad():
        logits = model(input_ids).logits
    targets = shift_labels(input_ids)
    per_chunk = [chunk_loss_sum(logits[:, s : s + CHUNK], targets[:, s : s + CHUNK]) / (SEQ - 1) for s in range(0, SEQ, CHUNK)]
    expected = cheap.compensation * sum(per_chunk[c] for c in cheap.selected)
    torch.testing.assert_close(cheap.loss, torch.as_tensor(expected, dtype=cheap.loss.dtype), rtol=1e-12, atol=1e-15)
