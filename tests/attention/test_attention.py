"""`chunkwise.attention`: the engine's own attention for a chunk over its stored past.

What this file proves:

* Both implementations (the CPU split kernel and the blocked one other devices use) equal SDPA over
  repeated KV heads with the lower-right causal mask — output and the gradients of query, key and
  value — in float64 to rounding, for grouped and plain heads, a chunk with and without a past,
  batches, and key blocks that split the past and the chunk anywhere. `gradcheck` agrees; inputs
  without grad are handled; in bfloat16 they are as accurate as SDPA.
* It runs where it should and only there: on every layer of an unpadded Llama step, never with
  `attention="model"`, and not on layers whose mask is not plain causal (padding, a sliding window
  shorter than the keys). Either way SeCO's gradient equals full backprop (float64).
* What it keeps for backward: no KV tensor repeated to the query heads and no float mask, which the
  model's SDPA attention does keep (so the check can fail).
* The model's attention setting is restored after a step, also when the step raises.
* `offload_kv=True` gives bit-identical losses and gradients (SeCO and SpaCO), through either kernel;
  the blocked kernel through the whole engine equals full backprop. (On this CPU-only machine "host"
  and "device" are the same memory: the device-side saving is for a GPU to measure.)
"""

from __future__ import annotations

import pytest
import torch
from attention_reference import F64_TOL, assert_matches_sdpa, random_inputs, sdpa_reference
from kernel_fixtures import kernel_calls  # noqa: F401  (a fixture)
from reference import full_backward, max_relative_error, trainable_grads
from tiny_models import random_ids

import chunkwise.attention.chunk as attention
import chunkwise.attention.kernels as kernels
from chunkwise import SeCO, SpaCO
from chunkwise.attention.chunk import ATTENTION_NAME, _BlockedAttention, _SplitAttention, causal_chunk_attention
from chunkwise.models.presets import build_tiny_model

def split(query, key, value, scale):
    return _SplitAttention.apply(query, key, value, scale)


def blocked(block):
    return lambda query, key, value, scale: _BlockedAttention.apply(query, key, value, scale, block)


# The CPU implementation, and the plain-ops one with blocks that cut the past and the chunk at odd places.
IMPLEMENTATIONS = {"split": split, "blocked-3": blocked(3), "blocked-6": blocked(6), "blocked-128": blocked(128)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, chunk, length",
    [
        (1, 4, 4, 5, 5),  # no past
        (2, 4, 2, 5, 23),  # GQA with a past
        (2, 8, 2, 7, 40),  # 4 query heads per KV head
        (1, 6, 3, 16, 16),  # no past, more queries than a block
        (1, 2, 1, 1, 9),  # a single query token (decoding-like)
    ],
)
def test_kernel_matches_sdpa(implementation, batch, heads, kv_heads, chunk, length):
    assert_matches_sdpa(IMPLEMENTATIONS[implementation], batch, heads, kv_heads, chunk, length, scale=0.3)


def test_cpu_uses_the_split_kernel(monkeypatch):
    causal_chunk_attention(*random_inputs(1, 4, 2, 3, 7), 0.5)  # the kernel's first-use check runs here
    used, original = [], _SplitAttention.apply
    monkeypatch.setattr(attention._SplitAttention, "apply", lambda *args: used.append(args[-1].name) or original(*args))
    causal_chunk_attention(*random_inputs(1, 4, 2, 3, 7), 0.5)
    assert used == ["cpu-flash"]


@pytest.mark.parametrize("implementation", ["split", "blocked-3"])
def test_gradcheck(implementation):
    query, key, value = random_inputs(1, 4, 2, 3, 7, dim=4)
    function = IMPLEMENTATIONS[implementation]
    assert torch.autograd.gradcheck(lambda q, k, v: function(q, k, v, 0.5), (query, key, value))


@pytest.mark.parametrize("implementation", ["split", "blocked-3"])
def test_inputs_without_grad(implementation):
    query, key, value = random_inputs(1, 4, 2, 3, 7)
    key.requires_grad_(False)
    output = IMPLEMENTATIONS[implementation](query, key, value, 0.5)
    grad_query, grad_value = torch.autograd.grad(output.sum(), (query, value))
    expected = sdpa_reference(query, key, value, 0.5)
    expected_query, expected_value = torch.autograd.grad(expected.sum(), (query, value))
    torch.testing.assert_close(grad_query, expected_query, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(grad_value, expected_value, rtol=0, atol=F64_TOL)


@pytest.mark.parametrize("implementation", ["split", "blocked-128"])
def test_bfloat16_is_as_accurate_as_sdpa(implementation):
    """In bfloat16 the kernel's error against float64 is SDPA's own (scores and softmax in float32).

    Summed over seeds 0-4 of the output's and the three gradients' max errors, measured: SDPA 0.114,
    split 0.123, blocked 0.117 (0.19 when the blocked scores were rounded to bfloat16 before the
    softmax). A wrong result has errors of order 1.
    """
    errors = {"kernel": 0.0, "sdpa": 0.0}
    for seed in range(5):
        query, key, value = random_inputs(1, 8, 2, 32, 200, dim=16, seed=seed)
        exact = sdpa_reference(query, key, value, 0.25)
        grad_output = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        exact_grads = torch.autograd.grad(exact, (query, key, value), grad_output)
        low = [t.detach().bfloat16().requires_grad_() for t in (query, key, value)]
        for name, function in (("kernel", IMPLEMENTATIONS[implementation]), ("sdpa", sdpa_reference)):
            output = function(*low, 0.25)
            grads = torch.autograd.grad(output, low, grad_output.bfloat16())
            errors[name] += (output.double() - exact).abs().max().item()
            errors[name] += sum(
                ((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, exact_grads)
            )
    assert errors["kernel"] < 1.25 * errors["sdpa"]


# ----- inside a model step -------------------------------------------------------------------------------


def seco_error(model, input_ids, chunk_size, attention_mask=None, loss_tol=1e-12, **options) -> float:
    """max relative gradient error of SeCO against full backprop (float64)."""
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    loss, expected = full_backward(model, input_ids, labels=labels, attention_mask=attention_mask)
    model.zero_grad(set_to_none=True)
    engine = SeCO(model, chunk_size=chunk_size, **options)
    out = engine.backward(input_ids, labels=labels, attention_mask=attention_mask)
    assert abs(out.loss.item() - loss.item()) <= loss_tol * abs(loss.item())
    return max_relative_error(trainable_grads(model), expected)


def test_runs_on_every_layer_of_an_unpadded_step(kernel_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    assert seco_error(model, random_ids(2), chunk_size=5) < 1e-10
    layers = model.config.num_hidden_layers
    # 6 chunks: stage 1 runs chunks 0-4, stage 2 rebuilds all 6; every layer each time.
    assert kernel_calls == {"kernel": 11 * layers, "sdpa": 0}
    assert model.config._attn_implementation == "sdpa"


def test_attention_model_never_runs_it(kernel_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    assert seco_error(model, random_ids(2), chunk_size=5, attention="model") < 1e-10
    assert kernel_calls == {"kernel": 0, "sdpa": 0}


def test_padding_falls_back_on_the_chunks_that_see_it(kernel_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 12:] = 0  # row 1's padding starts in chunk 2 (tokens 10-14)
    assert seco_error(model, random_ids(2), chunk_size=5, attention_mask=mask) < 1e-10
    layers = model.config.num_hidden_layers
    # Chunks 0 and 1 see no padding (stage 1 + stage 2: 4 runs); chunks 2-5 do (3 + 4 runs).
    assert kernel_calls == {"kernel": 4 * layers, "sdpa": 7 * layers}


def test_a_sliding_window_shorter_than_the_keys_falls_back(kernel_calls):
    model = build_tiny_model("tiny-mistral", dtype=torch.float64)  # sliding window 8
    assert seco_error(model, random_ids(2), chunk_size=5) < 1e-10
    layers = model.config.num_hidden_layers
    # Chunk 0 (5 keys) and chunk 1 (10 keys: the window of 8 already hides some) — only chunk 0's
    # keys fit in the window, in stage 1 and stage 2.
    assert kernel_calls == {"kernel": 2 * layers, "sdpa": 9 * layers}


def test_unknown_choice_is_refused():
    model = build_tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="attention must be one of 'chunkwise', 'model'"):
        SeCO(model, chunk_size=4, attention="flash")


def test_setting_is_restored_when_the_step_raises(monkeypatch):
    model = build_tiny_model("tiny-llama")
    engine = SeCO(model, chunk_size=4)
    seen = []

    def failing_forward(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.handle.decoder, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        engine.backward(random_ids(1, 12))
    assert seen == [ATTENTION_NAME]
    assert model.config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone(kernel_calls):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    model.set_attn_implementation("eager")
    # Eager attention takes its softmax in float32 even in a float64 model (transformers' eager_attention_forward:
    # `softmax(..., dtype=torch.float32)`), so chunked and full passes differ by float32 rounding there. Derivation
    # (u = 2^-24): a softmax row over S <= 29 keys is computed in another grouping (a chunk's keys vs all), its
    # float32 sum of S terms differs by <= 2(S - 1)u = 3.3e-6 relative and each exp by 2u: ~3.5e-6 on each attention
    # weight, so ~3.5e-6 x |attention output| per layer (2 layers) on the hidden states and ~7e-6 x |z| <= 4.2e-6 on
    # the logits (|z| <= 0.6): the loss (l ~ 4.85) moves by <= 2 x 4.2e-6 / 4.85 = 1.7e-6 relative, x2 for second-order
    # terms: loss_tol 4e-6 (was 1e-6, below this bound; measured < 1e-7). The gradients carry the same relative errors
    # through softmax's backward (measured 1.9e-7 against 1e-5: room for a cancellation factor of ~3 over the worst
    # case). A wrong gradient or loss is off by >= 1e-1.
    assert seco_error(model, random_ids(2), chunk_size=5, loss_tol=4e-6) < 1e-5
    assert kernel_calls == {"kernel": 0, "sdpa": 0}
    assert model.config._attn_implementation == "eager"


# ----- what is kept for backward -------------------------------------------------------------------------


def saved_for_backward(model, input_ids, chunk_size, attention_choice) -> list[torch.Tensor]:
    """Every tensor autograd saved during a SeCO step."""
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    engine = SeCO(model, chunk_size=chunk_size, attention=attention_choice)
    engine.backward(input_ids)  # once unrecorded: the kernel's first-use check saves tensors of its own
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        engine.backward(input_ids)
    return saved


@pytest.mark.parametrize("attention_choice, kept", [("model", True), ("chunkwise", False)])
def test_no_repeated_kv_or_mask_is_kept(attention_choice, kept):
    model = build_tiny_model("tiny-llama")  # 4 query heads over 2 KV heads, head dim 16
    heads = model.config.num_attention_heads
    saved = saved_for_backward(model, random_ids(1, 40), 8, attention_choice)
    # Chunks 2-4 (of 8 tokens) attend over 24, 32 and 40 keys; nothing else in the step has those lengths.
    past_lengths = (24, 32, 40)
    repeated_kv = [t for t in saved if t.dim() == 4 and t.shape[1] == heads and t.shape[2] in past_lengths]
    float_mask = [
        t for t in saved if t.dim() == 4 and t.shape[1:3] == (1, 8) and t.shape[3] in past_lengths and t.is_floating_point()
    ]
    assert bool(repeated_kv) == kept
    assert bool(float_mask) == kept


# ----- the blocked kernel (other devices) and host offload, through the engine -----------------------------


@pytest.fixture
def blocked_kernel(monkeypatch):
    """Make the engine use `_BlockedAttention` on CPU too, with small blocks, as it does on other devices."""
    monkeypatch.setattr(kernels, "KERNELS", [])  # no fused kernel: the blocked one is the last resort
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(attention, "_MIN_BLOCK", 3)  # 3-key blocks: cuts through every chunk's past and keys


@pytest.mark.parametrize("kernel", ["split", "blocked"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_offload_gives_the_same_gradient(request, kernel, preset):
    if kernel == "blocked":
        request.getfixturevalue("blocked_kernel")
    model = build_tiny_model(preset, dtype=torch.float64)
    input_ids = random_ids(2)
    # Gemma 3's float32 norms: the derivation of test_seco_exactness.GEMMA_F64_TOL (offloading itself changes no bit).
    tol = 1e-5 if preset == "tiny-gemma3" else 1e-10
    _, expected = full_backward(model, input_ids)
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        out = SeCO(model, chunk_size=5, offload_kv=offload).backward(input_ids)
        results.append((out.loss, trainable_grads(model)))
    (loss, grads), (offload_loss, offload_grads) = results
    assert max_relative_error(grads, expected) < tol
    assert torch.equal(loss, offload_loss)
    assert all(torch.equal(offload_grads[name], grads[name]) for name in grads)


def test_spaco_offload_gives_the_same_gradient():
    model = build_tiny_model("tiny-qwen3", dtype=torch.float64)
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        SpaCO(model, chunk_size=4, budget=3, seed=1, offload_kv=offload).backward(random_ids(2))
        results.append(trainable_grads(model))
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])


@pytest.mark.parametrize("implementation, choice", [("sdpa", "model"), ("eager", "chunkwise")])
def test_offload_needs_the_engine_attention(implementation, choice):
    model = build_tiny_model("tiny-llama")
    model.set_attn_implementation(implementation)
    with pytest.raises(ValueError, match="offload_kv=True .* needs attention='chunkwise'"):
        SeCO(model, chunk_size=4, attention=choice, offload_kv=True)
