"""Preference and RL objectives: SeCO's loss and gradient equal a plain full-sequence implementation.

Each reference below is written from its paper's formula with ordinary tensor ops over one
full-sequence forward (no chunkwise code but the tiny model presets): per-token log-probs
`log_softmax(logits).gather(next token)`, summed over a response for the sequence-level losses.

What is checked (float64, 1e-10 relative):

* DPO (sigmoid), IPO (length-normalised as TRL, and the paper's summed form), SimPO, and GRPO with each
  normalisation (per-sequence mean, per-token over the batch, fixed length), with old log-probs that
  make the clip active and a KL term to a reference (and once without the KL term);
* on Llama, Qwen3 and Mistral (sliding window 8), full fine-tuning with a separate reference model and
  LoRA with the adapter-disabled base as reference; one chunk and chunks of 5 tokens that cut through
  prompts and responses; right-padded rows of different lengths.
* SpaCO: budget >= k is SeCO bit for bit; the Bernoulli estimate's expectation (by enumeration of
  every selection) equals SeCO's gradient, for a token-local (GRPO) and a sequence-level (DPO) loss.
* Bad input is refused before any model call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import engine_backward, loss_and_gradients, max_relative_error, trainable_grads
from spaco_reference import FixedSelection, bernoulli_selections, expected_gradient
from tiny_models import lora_model, norms_in_model_dtype

from chunkwise import SeCO, SpaCO
from chunkwise.core.objectives import DPO, GRPO, IPO, CrossEntropy, SimPO, TokenLoss
from chunkwise.core.reference import ADAPTER_DISABLED
from chunkwise.models.presets import build_tiny_model

VOCAB = 128
TOL = 1e-10
PAD = 0


# ----- data: prompts + responses, right-padded ----------------------------------------------------------


def _rows(prompts, responses, generator):
    """input_ids / attention_mask / labels for rows prompt_i + response_i (lengths given), right-padded."""
    width = max(p + r for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=generator)
        mask[row, : p + r] = 1
        labels[row, p : p + r] = ids[row, p : p + r]
    return ids, mask, labels


def paired_batch(seed=0):
    """2 pairs: rows 0-1 chosen, rows 2-3 rejected; the pair's rows share their prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids, mask, labels = _rows([9, 6, 9, 6], [8, 11, 13, 5], generator)
    ids[2, :9], ids[3, :6] = ids[0, :9], ids[1, :6]  # a pair's rows share their prompt tokens
    return ids, mask, labels


def rl_batch(seed=0):
    """3 prompt + completion rows of different lengths."""
    return _rows([7, 12, 4], [10, 6, 14], torch.Generator().manual_seed(seed))


# ----- the plain full-sequence references ---------------------------------------------------------------


def full_token_logps(model, ids, mask, labels):
    """[N, T-1] log-prob of each next token (0 where the label is -100), one full forward."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, picked, torch.zeros_like(picked))


def sums_and_lengths(logps, labels):
    return logps.sum(1), (labels[:, 1:] != -100).sum(1).double()


def dpo_loss(pi, ref, lengths, beta):
    (pc, pr), (rc, rr) = pi.chunk(2), ref.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def ipo_loss(pi, ref, lengths, beta, normalized):
    ratio = pi - ref
    if normalized:
        ratio = ratio / lengths
    chosen, rejected = ratio.chunk(2)
    return ((chosen - rejected - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(pi, ref, lengths, beta, gamma):
    chosen, rejected = (beta * pi / lengths).chunk(2)
    return -F.logsigmoid(chosen - rejected - gamma).mean()


def grpo_loss(logps, old, ref, advantages, labels, *, beta, eps, normalization, max_length=None, kl_ratio_weighted=False):
    """Per-token clipped surrogate + k3 KL (times the ratio: DeepSeek-V3.2), aligned with the targets [N, T-1]."""
    mask = (labels[:, 1:] != -100).double()
    ratio = torch.exp(logps - old)
    adv = advantages[:, 1:] if advantages.dim() == 2 else advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    if beta:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * (kl * ratio if kl_ratio_weighted else kl)
    if normalization == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if normalization == "token":
        return (per_token * mask).sum() / mask.sum()
    return (per_token * mask).sum() / (mask.shape[0] * max_length)


# ----- the comparison ------------------------------------------------------------------------------------


def models_for(preset, variant):
    """(policy, reference argument, reference forward context) for full fine-tuning or LoRA."""
    if variant == "full":
        policy = build_tiny_model(preset, dtype=torch.float64, seed=0)
        reference = build_tiny_model(preset, dtype=torch.float64, seed=1)
        return policy, reference, lambda ids, mask, labels: full_token_logps(reference, ids, mask, labels)
    policy = lora_model(preset)

    def adapter_disabled(ids, mask, labels):
        with policy.disable_adapter():
            return full_token_logps(policy, ids, mask, labels)

    return policy, ADAPTER_DISABLED, adapter_disabled


def assert_close(out, grads, ref_loss, ref_grads, what):
    loss_error = abs(out.loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert loss_error <= TOL, f"{what}: loss {out.loss.item()!r} vs {ref_loss.item()!r}"
    error = max_relative_error(grads, ref_grads)
    assert error <= TOL, f"{what}: gradient error {error:.3g}"


LOSSES = ["dpo", "ipo", "ipo-summed", "simpo", "grpo-sequence", "grpo-token", "grpo-fixed", "grpo-token-nokl"]


def case(loss_name, policy, reference, reference_logps):
    """(batch, chunkwise objective, plain loss closure) for one loss."""
    if loss_name.startswith("grpo"):
        ids, mask, labels = rl_batch()
        with torch.no_grad():
            current = full_token_logps(policy, ids, mask, labels)
            ref = reference_logps(ids, mask, labels)
        # Old log-probs off by up to ±0.5 nats: many ratios fall outside [0.8, 1.2], so the clip matters.
        noise = (torch.rand(current.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5)
        old = current + noise
        assert ((torch.exp(current - old) - 1).abs() > 0.2).logical_and(labels[:, 1:] != -100).sum() >= 5
        normalization = loss_name.split("-")[1]
        beta = 0.0 if loss_name.endswith("nokl") else 0.04  # the KL term is optional: no reference without it
        if normalization == "token":  # per-token advantages in this case, per-sequence in the others
            advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        else:
            advantages = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
        max_length = 16 if normalization == "fixed" else None
        weighted = normalization == "fixed"  # the ratio-weighted KL in one of the three
        old_labels_aligned = F.pad(old, (1, 0))  # chunkwise takes per-token tensors aligned with labels
        objective = GRPO(advantages=advantages, old_logps=old_labels_aligned, reference=reference if beta else None, beta=beta,
                         epsilon=0.2, normalization=normalization, max_length=max_length, kl_ratio_weighted=weighted)

        def plain():
            logps = full_token_logps(policy, ids, mask, labels)
            return grpo_loss(logps, old, ref, advantages, labels, beta=beta, eps=0.2, normalization=normalization,
                             max_length=max_length, kl_ratio_weighted=weighted)

        return (ids, mask, labels), objective, plain

    ids, mask, labels = paired_batch()
    with torch.no_grad():
        ref_sums, _ = sums_and_lengths(reference_logps(ids, mask, labels), labels)
    objective, formula = {
        "dpo": (DPO(beta=0.5, reference=reference), lambda pi, lengths: dpo_loss(pi, ref_sums, lengths, 0.5)),
        "ipo": (IPO(beta=0.5, reference=reference), lambda pi, lengths: ipo_loss(pi, ref_sums, lengths, 0.5, True)),
        "ipo-summed": (IPO(beta=0.5, reference=reference, length_normalized=False), lambda pi, lengths: ipo_loss(pi, ref_sums, lengths, 0.5, False)),
        "simpo": (SimPO(beta=2.0, gamma=0.5), lambda pi, lengths: simpo_loss(pi, None, lengths, 2.0, 0.5)),
    }[loss_name]

    def plain():
        return formula(*sums_and_lengths(full_token_logps(policy, ids, mask, labels), labels))

    return (ids, mask, labels), objective, plain


PRESETS = ["tiny-llama", "tiny-qwen3", "tiny-mistral"]
# Every loss on every preset; full fine-tuning and LoRA alternate along both axes, so each loss meets
# both variants and each preset both, at half the cost of the full product.
MATRIX = [(preset, loss, ("full", "lora")[(i + j) % 2]) for i, preset in enumerate(PRESETS) for j, loss in enumerate(LOSSES)]


@pytest.mark.parametrize("preset, loss_name, variant", MATRIX, ids=["-".join(case) for case in MATRIX])
def test_seco_matches_full_sequence_formula(preset, loss_name, variant):
    policy, reference, reference_logps = models_for(preset, variant)
    (ids, mask, labels), objective, plain = case(loss_name, policy, reference, reference_logps)
    ref_loss, ref_grads = loss_and_gradients(policy, plain)
    for chunk_size in (5, 64):  # 5 cuts through prompts and responses; 64 is one chunk
        policy.zero_grad(set_to_none=True)
        out = SeCO(policy, chunk_size=chunk_size).backward(ids, labels=labels, attention_mask=mask, objective=objective)
        assert_close(out, trainable_grads(policy), ref_loss, ref_grads, f"{preset} {variant} {loss_name} chunk {chunk_size}")


def test_precomputed_reference_equals_reference_model():
    policy, reference, reference_logps = models_for("tiny-llama", "full")
    ids, mask, labels = paired_batch()
    with torch.no_grad():
        sums, _ = sums_and_lengths(reference_logps(ids, mask, labels), labels)
    engine = SeCO(policy, chunk_size=5)
    results = []
    for given in (reference, sums):
        policy.zero_grad(set_to_none=True)
        out = engine.backward(ids, labels=labels, attention_mask=mask, objective=DPO(beta=0.5, reference=given))
        results.append((out, trainable_grads(policy)))
    (out_model, grads_model), (out_tensor, grads_tensor) = results
    assert abs(out_model.loss.item() - out_tensor.loss.item()) <= TOL * abs(out_tensor.loss.item())
    assert max_relative_error(grads_model, grads_tensor) <= TOL
    # The implicit rewards, for logs: beta * (policy - reference) summed log-probs, averaged per half.
    pi, _ = sums_and_lengths(full_token_logps(policy, ids, mask, labels).detach(), labels)
    rewards = 0.5 * (pi - sums)
    assert out_model.metrics["rewards/margins"] == pytest.approx((rewards[:2] - rewards[2:]).mean().item(), rel=1e-10)
    assert out_model.metrics["rewards/accuracies"] == (rewards[:2] > rewards[2:]).double().mean().item()


def test_cross_entropy_objective_is_the_default_bit_for_bit():
    model = build_tiny_model("tiny-qwen3", dtype=torch.float64)
    ids, mask, labels = rl_batch()
    results = []
    for objective in (None, CrossEntropy()):
        model.zero_grad(set_to_none=True)
        out = SeCO(model, chunk_size=5).backward(ids, labels=labels, attention_mask=mask, num_items=17, objective=objective)
        results.append((out, trainable_grads(model)))
    (default, default_grads), (explicit, explicit_grads) = results
    assert torch.equal(default.loss, explicit.loss) and default.metrics == explicit.metrics == {}
    for name in default_grads:
        assert torch.equal(default_grads[name], explicit_grads[name]), name


def test_custom_token_loss_is_weighted_cross_entropy():
    """TokenLoss with fn = -logps and token normalisation is cross-entropy (a user-defined loss works)."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    ids, mask, labels = rl_batch()
    engine = SeCO(model, chunk_size=5)
    model.zero_grad(set_to_none=True)
    reference_out = engine.backward(ids, labels=labels, attention_mask=mask)
    expected = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    out = engine.backward(ids, labels=labels, attention_mask=mask, objective=TokenLoss(lambda logps: -logps))
    assert abs(out.loss.item() - reference_out.loss.item()) <= TOL * reference_out.loss.item()
    assert max_relative_error(trainable_grads(model), expected) <= TOL


# ----- SpaCO -----------------------------------------------------------------------------------------------

K = 4  # chunks of 6 tokens over the 22-token rows below (the last one ragged)
CHUNK = 6


@pytest.fixture(scope="module")
def spaco_setup():
    """A float64-throughout model (see test_spaco), a 22-token paired batch, and the objectives."""
    model = norms_in_model_dtype(build_tiny_model("tiny-llama", dtype=torch.float64, seed=0))
    ids, mask, labels = _rows([7, 5, 7, 5], [15, 17, 12, 9], torch.Generator().manual_seed(5))
    ids[2, :7], ids[3, :5] = ids[0, :7], ids[1, :5]
    advantages = torch.tensor([0.9, -1.1, 0.3, 0.5], dtype=torch.float64)
    with torch.no_grad():
        current = F.pad(full_token_logps(model, ids, mask, labels), (1, 0))
    old = current + 0.4 * (torch.rand(current.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) - 0.5)
    reference = torch.tensor([-80.0, -85.0, -60.0, -50.0], dtype=torch.float64)
    objectives = {
        "grpo": lambda: GRPO(advantages=advantages, old_logps=old, normalization="token"),
        "dpo": lambda: DPO(beta=0.1, reference=reference),
    }
    return model, (ids, mask, labels), objectives


def _step(model, engine, batch, objective):
    ids, mask, labels = batch
    return engine_backward(model, engine, ids, labels=labels, attention_mask=mask, objective=objective)


@pytest.mark.parametrize("name", ["grpo", "dpo"])
@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_spaco_full_budget_is_seco_bit_for_bit(spaco_setup, name, sampling):
    model, batch, objectives = spaco_setup
    seco_out, seco_grads = _step(model, SeCO(model, chunk_size=CHUNK), batch, objectives[name]())
    out, grads = _step(model, SpaCO(model, chunk_size=CHUNK, budget=K, sampling=sampling), batch, objectives[name]())
    assert out.selected == tuple(range(K)) and out.compensation == 1.0
    assert torch.equal(out.loss, seco_out.loss)
    for key in seco_grads:
        assert torch.equal(grads[key], seco_grads[key]), key


@pytest.mark.parametrize("name", ["grpo", "dpo"])
def test_spaco_bernoulli_expectation_is_seco(spaco_setup, name):
    """E[ĝ] over every one of the 2^4 selections, weighted by its Bernoulli probability, is SeCO's gradient."""
    model, batch, objectives = spaco_setup
    budget = 2
    seco_out, exact = _step(model, SeCO(model, chunk_size=CHUNK), batch, objectives[name]())

    def gradient(chunks):
        engine = SpaCO(model, chunk_size=CHUNK, budget=budget, sampling=FixedSelection(chunks, budget=budget))
        out, grads = _step(model, engine, batch, objectives[name]())
        if name == "dpo":  # the sequence-level loss is exact whatever the selection
            assert abs(out.loss.item() - seco_out.loss.item()) <= TOL * abs(seco_out.loss.item())
        return grads

    mean = expected_gradient(gradient, bernoulli_selections(K, budget))
    # Measured: ~1e-15 (float64 rounding); a wrong compensation or relay is off by O(1).
    assert max_relative_error(mean, exact) < TOL


# ----- bad input: refused before any model call --------------------------------------------------------------


@pytest.fixture
def counted_model():
    """A tiny model whose forward calls are counted (pre-hooks on the LM and its decoder)."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    model.get_decoder().register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


def _other_vocabulary_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).double()


def bad_cases(model):
    """name -> (batch, objective, expected message)."""
    paired = paired_batch()
    rl = rl_batch()
    ids, mask, labels = rl
    empty_rl = (ids, mask, labels.clone())
    empty_rl[2][1] = -100  # row 1: no response token
    empty_paired = (paired[0], paired[1], paired[2].clone())
    empty_paired[2][1] = -100
    odd = tuple(t[:3] for t in paired)
    return {
        "odd-rows": (odd, DPO(beta=0.1, reference=torch.zeros(3, dtype=torch.float64)), "needs paired rows"),
        "reference-length": (paired, DPO(beta=0.1, reference=torch.zeros(3, dtype=torch.float64)), r"must be a float tensor \[4\]"),
        "per-token-shape": (rl, GRPO(advantages=torch.ones(3), old_logps=torch.zeros(3, ids.shape[1] - 1)), r"old_logps must be \[batch, seq_len\]"),
        "advantages-shape": (rl, GRPO(advantages=torch.ones(2)), "advantages must be"),
        "empty-row-simpo": (empty_paired, SimPO(), "row 1 of the batch has no response token"),
        "empty-row-grpo": (empty_rl, GRPO(advantages=torch.ones(3)), "row 1 of the batch has no response token"),
        "reference-vocabulary": (paired, DPO(beta=0.1, reference=_other_vocabulary_model()), "vocabulary has 130 tokens"),
        "adapter-without-peft": (paired, DPO(beta=0.1, reference=ADAPTER_DISABLED), "needs a PEFT"),
        "reference-is-policy": (paired, DPO(beta=0.1, reference=model), "the reference is the model being trained"),
    }


BAD_CASES = ["odd-rows", "reference-length", "per-token-shape", "advantages-shape", "empty-row-simpo", "empty-row-grpo",
             "reference-vocabulary", "adapter-without-peft", "reference-is-policy"]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_refused_before_any_model_call(counted_model, name):
    model, calls = counted_model
    (ids, mask, labels), objective, message = bad_cases(model)[name]
    with pytest.raises((ValueError, TypeError), match=message):
        SeCO(model, chunk_size=5).backward(ids, labels=labels, attention_mask=mask, objective=objective)
    assert calls == []


def test_objective_settings_are_checked():
    with pytest.raises(ValueError, match="compares the model with a reference"):
        DPO(beta=0.1)
    with pytest.raises(ValueError, match="beta=0.1 weighs a KL term"):
        GRPO(advantages=torch.ones(2), beta=0.1)
    with pytest.raises(ValueError, match="only used by the KL term"):
        GRPO(advantages=torch.ones(2), reference=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="normalization must be one of"):
        GRPO(advantages=torch.ones(2), normalization="mean")
    with pytest.raises(ValueError, match="divides by max_length"):
        GRPO(advantages=torch.ones(2), normalization="fixed")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        DPO(beta=0.0, reference=torch.zeros(2))
    with pytest.raises(TypeError, match="objective must be"):
        SeCO(build_tiny_model("tiny-llama"), chunk_size=CHUNK).backward(torch.ones(1, 4, dtype=torch.long), objective="dpo")
