"""SeCO computes the exact gradient of ordinary full-sequence backprop (DESIGN.md §2, §4).

What this file proves, on tiny CPU models of every preset family (Llama, Qwen2, Qwen3, Mistral with a
sliding window, Gemma 3 with alternating sliding/global layers):

* float64: SeCO's loss and every trainable parameter's gradient equal one full-sequence backward to
  1e-10 relative error, for chunk size 1, a ragged chunk size (5 on 29 tokens) and chunk size >= the
  sequence (measured: <= 1e-15, i.e. float64 rounding; Gemma 3 ~1.4e-7, its internal float32 norms).
* Each condition for exactness listed in DESIGN.md §2 holds: right-padded batches (and the default
  labels that ignore padding), -100 spans including whole chunks without a target, global
  normalisation by `num_items`, gradient accumulation across calls, LoRA through peft, and LoRA
  dropout (the same masks as a differentiable chunk-by-chunk forward with the same seed).
* The sliding window really changes the result (so the Mistral/Gemma agreement is not trivial).
* float32 and bfloat16: SeCO is as accurate as full backprop of the same precision.
* The loss convention (shift, -100, normalisation, `num_items_in_batch`) is transformers' own.
* The returned `ChunkwiseOutput` reports what it says, and the global RNG after `backward` is
  deterministic.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import chunk_by_chunk_backward, engine_backward, full_backward, max_relative_error, trainable_grads
from tiny_models import SEQ_LEN, lora_model, random_ids
from transformers import AutoModelForCausalLM

from chunkwise import SeCO
from chunkwise.models.presets import TINY_PRESETS, build_tiny_model

F64_TOL = 1e-10
# Gemma 3 computes its RMSNorms (and rotary tables) in float32 even inside a float64 model (transformers'
# Gemma3RMSNorm: `_norm(x.float()) * (1 + weight.float())`). Derivation (u = 2^-24): per token, chunked and full
# passes hand the norm the same input up to float64 rounding (~1e-16), so its float32 output and input gradient are
# the same bits except where a float64 difference crosses a float32 rounding boundary (probability ~1e-16/u per
# element, 2u when it does). What differs systematically is each norm weight's gradient, a float32 sum over the
# tokens of one call: n = 58 tokens at most (2 x 29) in the full pass, a chunk's in SeCO; two orders of a float32
# sum of n terms differ by at most 2(n - 1)u sum_t |g_t| = 6.8e-6 x kappa of the tensor's largest entry, kappa =
# sum_t |g_t| / |sum_t g_t| (the terms' signs vary over tokens). Measured chunk-vs-full: 1.3e-7..1.4e-7 (chunk 1
# and 5, plain and padded batches), i.e. kappa_eff ~0.02 against the worst-case order. 1e-5 admits the worst case
# for kappa <= 1.5 only; kappa is not measured here, and the measured errors sit 70x below. A real error (a lost
# chunk, a wrong normaliser, a missing factor) is >= 1e-1.
GEMMA_F64_TOL = 1e-5
# float32 SeCO vs float32 full backprop (both PyTorch float32 arithmetic on the same weights). Derivation: the
# loss is a float32 sum of n <= 58 token losses l_t ~ log V = 4.85 of a float32 log-softmax over V = 128
# (`reference.float32_log_softmax_error`: <= 150u ~ 9e-6 each, i.e. 1.9e-6 relative) in another grouping (per chunk,
# then across chunks): relative <= 2 (1.9e-6 + (n - 1)u) ~ 1e-5 in the worst case. Gradients: per-token seeds with
# that relative error, and every weight gradient a float32 sum over the tokens in another order (2(n - 1)u kappa).
# Measured worst over all presets, chunk sizes 1 and 5: gradients 8.7e-7, loss 2.0e-7, a tenth of these
# worst-case bounds; 1e-5 sits at them. A real error is >= 1e-1.
F32_TOL = 1e-5
# bfloat16 (bf16 weights, no autocast), each gradient's error against the float64 gradient of the same
# weights. Measured over seeds 0-9 for tiny-llama/qwen3/mistral/gemma3 (2 x 32 tokens, chunk 5):
# full-backprop error 0.009-0.033, SeCO error 0.011-0.034, ratio SeCO/full 0.72-1.40 (mean ~1.07).
# A wrong gradient has error of order 1.
BF16_RATIO_BOUND = 2.0
BF16_MAX_ERROR = 0.1


def f64_tol(preset: str) -> float:
    return GEMMA_F64_TOL if preset == "tiny-gemma3" else F64_TOL


def seco_backward(model, chunk_size, input_ids, **kwargs):
    """Fresh gradients from one SeCO backward: returns (output, grads)."""
    return engine_backward(model, SeCO(model, chunk_size=chunk_size), input_ids, **kwargs)


def assert_matches(loss, grads, ref_loss, ref_grads, tol, what=""):
    assert grads.keys() == ref_grads.keys()
    loss_error = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert loss_error <= tol, f"{what}: loss {loss.item()!r} vs reference {ref_loss.item()!r} (rel. error {loss_error:.3g})"
    grad_error = max_relative_error(grads, ref_grads)
    assert grad_error <= tol, f"{what}: max relative gradient error {grad_error:.3g} > {tol:g}"


# ----- 1. float64 and float32: SeCO == full backprop, every family ----------------------------------------

# Each dtype's chunk sizes and tolerance: float64 every kind of chunk size (one token, ragged, = and > the
# sequence) at f64_tol; float32 one token and ragged at F32_TOL.
DTYPE_CASES = {
    "float64-chunk1": (torch.float64, 1),
    "float64-ragged5": (torch.float64, 5),
    "float64-chunk=len": (torch.float64, SEQ_LEN),
    "float64-chunk>len": (torch.float64, 64),
    "float32-chunk1": (torch.float32, 1),
    "float32-ragged5": (torch.float32, 5),
}


def dtype_tol(dtype: torch.dtype, preset: str) -> float:
    return f64_tol(preset) if dtype == torch.float64 else F32_TOL


@pytest.mark.parametrize("dtype, chunk_size", list(DTYPE_CASES.values()), ids=list(DTYPE_CASES))
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_matches_full_backprop(preset, dtype, chunk_size):
    model = build_tiny_model(preset, dtype=dtype)
    input_ids = random_ids()
    ref_loss, ref_grads = full_backward(model, input_ids)
    out, grads = seco_backward(model, chunk_size, input_ids)
    assert out.loss.dtype == dtype
    assert_matches(out.loss, grads, ref_loss, ref_grads, dtype_tol(dtype, preset), f"{dtype} {preset} chunk {chunk_size}")


# ----- 2. the conditions for exactness ---------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_padded_batch_with_default_labels(preset):
    """Right padding: the mask is sliced per chunk, and default labels ignore padded positions.

    Under causal attention a real token never attends to the right padding after it, so a correctly
    aligned mask changes only the (ignored) padded positions; what this pins down is that each chunk's
    mask slice is aligned with the full pass (a misaligned slice hides real tokens and fails here) and
    that the default labels drop padded targets.
    """
    model = build_tiny_model(preset, dtype=torch.float64)
    input_ids = random_ids(batch=2, seed=1)
    mask = torch.ones_like(input_ids)
    mask[1, 17:] = 0  # row 2 has 17 real tokens: its padding covers more than two chunks of 5
    input_ids[1, 17:] = 0  # what a tokenizer's pad id would put there
    explicit_labels = input_ids.masked_fill(mask == 0, -100)
    ref_loss, ref_grads = full_backward(model, input_ids, labels=explicit_labels, attention_mask=mask)
    for chunk_size in (1, 5):
        out, grads = seco_backward(model, chunk_size, input_ids, attention_mask=mask)  # labels default
        assert_matches(out.loss, grads, ref_loss, ref_grads, f64_tol(preset), f"{preset} padded, chunk {chunk_size}")
        assert out.num_targets == (SEQ_LEN - 1) + (17 - 1)


# Target t is labels[t + 1]; with chunk size 5 the chunks are [0,5) [5,10) [10,15) [15,20) [20,25) [25,29).
LABEL_SPANS = {
    # labels[11:16] = -100 makes targets 10..14 invalid: chunk 2 has no target at all, yet later chunks
    # read its KV, so its parameters still get gradient through the relay. Plus a partial span in chunk 0.
    "middle-chunk": [(3, 5), (11, 16)],
    "first-chunk": [(1, 6)],  # chunk 0 has no target: only the relay flows through it
    "last-chunk": [(26, SEQ_LEN), (7, 9)],  # the last chunk has no target and no reader: skipped
    "two-empty-chunks": [(6, 16), (20, 22)],  # chunks 1 and 2 both empty
}


@pytest.mark.parametrize("spans", list(LABEL_SPANS.values()), ids=list(LABEL_SPANS))
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_ignored_label_spans(preset, spans):
    model = build_tiny_model(preset, dtype=torch.float64)
    input_ids = random_ids(seed=2)
    labels = input_ids.clone()
    for start, end in spans:
        labels[:, start:end] = -100
    ref_loss, ref_grads = full_backward(model, input_ids, labels=labels)
    out, grads = seco_backward(model, 5, input_ids, labels=labels)
    assert_matches(out.loss, grads, ref_loss, ref_grads, f64_tol(preset), f"{preset} spans {spans}")
    assert out.num_targets == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("num_items", [100, 17.5, torch.tensor(61.0, dtype=torch.float64)], ids=["int", "float", "tensor"])
def test_num_items_normalisation(num_items):
    """A caller-given normaliser (HF Trainer's num_items_in_batch) replaces the batch's target count."""
    model = build_tiny_model("tiny-qwen2", dtype=torch.float64)
    input_ids = random_ids(batch=2, seed=3)
    labels = input_ids.clone()
    labels[0, 4:12] = -100
    ref_loss, ref_grads = full_backward(model, input_ids, labels=labels, num_items=num_items)
    out, grads = seco_backward(model, 5, input_ids, labels=labels, num_items=num_items)
    assert_matches(out.loss, grads, ref_loss, ref_grads, F64_TOL, f"num_items={num_items}")
    # and it is really not the default normalisation
    default_loss, _ = full_backward(model, input_ids, labels=labels)
    assert abs(default_loss.item() - out.loss.item()) > 1e-3 * abs(default_loss.item())


def test_gradients_accumulate_across_calls():
    """Two backward calls without zero_grad leave the sum of the two batches' gradients, like loss.backward()."""
    model = build_tiny_model("tiny-mistral", dtype=torch.float64)
    first = random_ids(batch=1, seq_len=SEQ_LEN, seed=4)
    second = random_ids(batch=2, seq_len=23, seed=5)
    _, ref_first = full_backward(model, first)
    _, ref_second = full_backward(model, second)
    expected = {name: ref_first[name] + ref_second[name] for name in ref_first}

    model.zero_grad(set_to_none=True)
    engine = SeCO(model, chunk_size=5)
    engine.backward(first)
    engine.backward(second)
    error = max_relative_error(trainable_grads(model), expected)
    assert error <= F64_TOL, f"accumulated gradient error {error:.3g}"
    # not vacuous: the second call did add something
    assert max_relative_error(ref_first, expected) > 1e-2


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_lora_matches_full_backprop(preset):
    model = lora_model(preset)
    input_ids = random_ids(batch=2, seed=6)
    ref_loss, ref_grads = full_backward(model, input_ids)
    assert ref_grads and all(("lora_A" in n or "lora_B" in n) for n in ref_grads), "only LoRA weights train"
    assert all(g.abs().max() > 0 for g in ref_grads.values()), "every LoRA weight must get a non-zero gradient"
    out, grads = seco_backward(model, 5, input_ids)
    assert_matches(out.loss, grads, ref_loss, ref_grads, f64_tol(preset), f"{preset} LoRA")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_lora_dropout_redraws_the_same_masks(preset):
    """Dropout active: SeCO equals backprop through the chunk-by-chunk forward with the same seed."""
    model = lora_model(preset, dropout=0.3)
    model.train()
    input_ids = random_ids(seed=7)

    torch.manual_seed(123)
    ref_loss, ref_grads = chunk_by_chunk_backward(model, input_ids, chunk_size=5)
    torch.manual_seed(123)
    out, grads = seco_backward(model, 5, input_ids)
    assert_matches(out.loss, grads, ref_loss, ref_grads, F64_TOL, f"{preset} LoRA dropout")

    # Not vacuous: the dropout masks matter, so another seed gives another reference.
    torch.manual_seed(124)
    other_loss, other_grads = chunk_by_chunk_backward(model, input_ids, chunk_size=5)
    assert max_relative_error(other_grads, ref_grads) > 1e-2
    assert abs(other_loss.item() - ref_loss.item()) > 1e-6


# ----- 3. the sliding window is not a no-op -----------------------------------------------------------


def test_sliding_window_changes_the_result():
    """On 29 tokens, Mistral's window of 8 changes loss and gradient; SeCO follows the windowed model."""
    model = build_tiny_model("tiny-mistral", dtype=torch.float64)
    assert model.config.sliding_window == 8
    config = copy.deepcopy(model.config)
    config.sliding_window = None
    unwindowed = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    unwindowed.load_state_dict(model.state_dict())

    input_ids = random_ids()
    loss, grads = full_backward(model, input_ids)
    loss_nowin, grads_nowin = full_backward(unwindowed, input_ids)
    # Measured: loss 4.8848 vs 4.8750 (relative 2e-3); gradients differ by a relative 1.28.
    assert abs(loss.item() - loss_nowin.item()) > 1e-4 * abs(loss.item())
    assert max_relative_error(grads_nowin, grads) > 0.1

    out, seco_grads = seco_backward(model, 5, input_ids)
    assert_matches(out.loss, seco_grads, loss, grads, F64_TOL, "windowed Mistral")


# ----- 4. bfloat16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_bfloat16_is_as_accurate_as_full_backprop(preset, seed):
    model = build_tiny_model(preset, dtype=torch.bfloat16, seed=seed)
    input_ids = random_ids(batch=2, seq_len=32, seed=seed)
    _, truth = full_backward(copy.deepcopy(model).to(torch.float64), input_ids)  # same bf16 weights, exact math

    _, full = full_backward(model, input_ids)
    _, seco = seco_backward(model, 5, input_ids)
    full_error = max_relative_error({n: g.double() for n, g in full.items()}, truth)
    seco_error = max_relative_error({n: g.double() for n, g in seco.items()}, truth)
    assert seco_error < BF16_MAX_ERROR, f"SeCO bf16 gradient error {seco_error:.3g} is not bf16 rounding"
    assert seco_error <= BF16_RATIO_BOUND * full_error, (
        f"SeCO bf16 error {seco_error:.3g} vs full backprop's own bf16 error {full_error:.3g}"
    )


# ----- 5. the loss convention is transformers' -----------------------------------------------------------


def test_loss_matches_transformers_loss():
    """Shift, -100 and normalisation are transformers' (its loss upcasts to float32: compare in float32)."""
    model = build_tiny_model("tiny-llama", dtype=torch.float32)
    input_ids = random_ids(batch=2, seed=8)
    labels = input_ids.clone()
    labels[0, 3:9] = -100
    labels[1, 20:] = -100

    model.zero_grad(set_to_none=True)
    hf_loss = model(input_ids=input_ids, labels=labels).loss
    hf_loss.backward()
    hf_grads = trainable_grads(model)
    out, grads = seco_backward(model, 5, input_ids, labels=labels)
    torch.testing.assert_close(out.loss, hf_loss.detach(), rtol=F32_TOL, atol=0)
    assert max_relative_error(grads, hf_grads) <= F32_TOL

    num_items = 80
    hf_sum_loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=num_items).loss.detach()
    out = SeCO(model, chunk_size=5).backward(input_ids, labels=labels, num_items=num_items)
    torch.testing.assert_close(out.loss, hf_sum_loss, rtol=F32_TOL, atol=0)
    assert not torch.isclose(hf_sum_loss, hf_loss.detach(), rtol=1e-3)  # num_items really changed it


# ----- 6. the returned object, and the RNG -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 7, SEQ_LEN, 64])
def test_output_reports_the_run(chunk_size):
    model = build_tiny_model("tiny-qwen3", dtype=torch.float32)
    input_ids = random_ids(batch=2, seed=9)
    mask = torch.ones_like(input_ids)
    mask[1, 20:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[0, 2:6] = -100
    out = SeCO(model, chunk_size=chunk_size).backward(input_ids, labels=labels, attention_mask=mask)

    num_chunks = math.ceil(SEQ_LEN / chunk_size)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0
    assert not out.loss.requires_grad and out.loss.grad_fn is None
    assert out.num_targets == int((labels[:, 1:] != -100).sum()) == (SEQ_LEN - 1 - 4) + (20 - 1)
    assert out.num_chunks == num_chunks
    assert out.selected == tuple(range(num_chunks))
    assert out.compensation == 1.0


def test_global_rng_after_backward_is_deterministic():
    """With dropout drawing from the global RNG, identical runs leave identical RNG states (and gradients)."""
    model = lora_model("tiny-llama", dropout=0.3)
    model.train()
    input_ids = random_ids(seed=10)
    states, grads = [], []
    for _ in range(2):
        torch.manual_seed(7)
        _, g = seco_backward(model, 5, input_ids)
        states.append(torch.get_rng_state())
        grads.append(g)
    assert torch.equal(states[0], states[1])
    assert max_relative_error(grads[1], grads[0]) == 0.0
