"""The zero-gradient guard (`chunkwise.core.gradient_guard`): a step with targets that leaves every trainable
gradient exactly zero is an error; the steps where a zero gradient is legitimate pass silently."""

from __future__ import annotations

import contextlib

import pytest
import torch

from chunkwise import SeCO, SpaCO
from chunkwise.core.gradient_guard import ZeroGradientError
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.models.loading import add_lora
from chunkwise.models.presets import build_tiny_model
from chunkwise.objectives import GRPO

VANISHED = r"every trainable parameter's gradient is exactly zero or None"


@pytest.fixture
def model():
    return add_lora(build_tiny_model("tiny-llama", seed=0), rank=4, random_b=0.1, seed=1).train()


@contextlib.contextmanager
def graph_cut_to_zero(model):
    """Multiply the final norm's output by 0: the loss still has a graph, every gradient upstream is exactly 0
    (what a quantization backend's inference kernel did to LoRA gradients)."""
    handle = inspect_causal_lm(model)
    hook = handle.decoder.norm.register_forward_hook(lambda module, args, output: output * 0.0)
    try:
        yield
    finally:
        hook.remove()


def tokens(length=48):
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(5))


def all_zero(model) -> bool:
    return all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("engine", ["SeCO", "SpaCO"])
def test_a_step_with_targets_whose_gradients_all_vanish_is_an_error(model, engine):
    engine = SeCO(model, chunk_size=16) if engine == "SeCO" else SpaCO(model, chunk_size=16, budget=3)
    with graph_cut_to_zero(model), pytest.raises(ZeroGradientError, match=VANISHED) as error:
        engine.backward(tokens())
    message = str(error.value)
    assert "\n" not in message and "quantized base" in message and "96 valid targets" not in message
    assert "94 valid targets" in message  # 2 rows x 47 shifted targets


def test_gradients_zeroed_in_place_are_checked_too(model):
    """`zero_grad(set_to_none=False)` leaves zero tensors: the step still starts at zero and is checked."""
    engine = SeCO(model, chunk_size=16)
    engine.backward(tokens())
    model.zero_grad(set_to_none=False)
    with graph_cut_to_zero(model), pytest.raises(ZeroGradientError, match=VANISHED):
        engine.backward(tokens())


def test_a_healthy_step_passes(model):
    out = SeCO(model, chunk_size=16).backward(tokens())
    assert out.num_targets == 94 and not all_zero(model)


def test_a_spaco_step_that_backpropagates_no_chunk_with_targets_is_not_an_error(model):
    """Targets only in the last of three chunks; a uniform sample of one chunk misses it on some seeds: a zero
    gradient by design (SpaCO's estimate), not a fault."""
    input_ids = tokens()
    labels = torch.full_like(input_ids, -100)
    labels[:, 40:] = input_ids[:, 40:]
    missed = 0
    for seed in range(6):
        model.zero_grad(set_to_none=True)
        out = SpaCO(model, chunk_size=16, budget=1, seed=seed).backward(input_ids, labels=labels)
        if 2 not in out.selected:
            missed += 1
            assert all_zero(model)
    assert missed > 0, "no seed missed the last chunk: the case is not exercised"


def test_a_batch_without_valid_targets_is_not_an_error(model):
    input_ids = tokens()
    out = SeCO(model, chunk_size=16).backward(input_ids, labels=torch.full_like(input_ids, -100))
    assert out.num_targets == 0 and all_zero(model)


def test_grpo_whose_advantages_all_tie_is_not_an_error(model):
    """Every group's rewards equal: advantages 0, GRPO's gradient is exactly zero (TRL trains on)."""
    input_ids = tokens()
    labels = input_ids.clone()
    labels[:, :8] = -100
    SeCO(model, chunk_size=16).backward(input_ids, labels=labels, objective=GRPO(advantages=torch.zeros(2)))
    assert all_zero(model)


def test_a_micro_batch_after_one_that_left_gradient_is_not_checked(model):
    """Documented scope: "did this call add anything" would need a snapshot of every gradient; the step's
    first micro-batch is the one checked (a broken backend zeroes all of them)."""
    engine = SeCO(model, chunk_size=16)
    engine.backward(tokens())
    with graph_cut_to_zero(model):
        engine.backward(tokens())
    assert not all_zero(model)


def test_a_repacked_4bit_base_is_caught_when_the_protection_is_off(monkeypatch):
    """The real fault: without `trainable_quantized_layers`, SeCO on an eval-mode 4-bit base leaves every LoRA
    gradient exactly 0 (bitsandbytes' CPU inference repack); the guard turns that into an error."""
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    import warnings

    from chunkwise.core import engine as engine_module
    from chunkwise.models.loading import load_causal_lm
    from chunkwise.models.quantize import Quantization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_causal_lm("tiny-llama", quantization=Quantization(load_in_4bit=True))
    model = add_lora(base, rank=4, random_b=0.1, seed=1).eval()
    monkeypatch.setattr(engine_module, "trainable_quantized_layers", lambda model: contextlib.nullcontext())
    with pytest.raises(ZeroGradientError, match=VANISHED):
        SeCO(model, chunk_size=16).backward(tokens())
