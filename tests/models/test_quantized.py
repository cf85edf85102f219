"""Quantized bases (QLoRA): LoRA gradients on bitsandbytes 4-bit (nf4) and 8-bit bases, trained chunk-wise.

The reference is ordinary full-sequence backprop through the same quantized model (train mode, float32
compute). Chunked and full differ only in float32 summation order inside attention; that rounding is ~1e-7
relative per term here (measured max 6e-7 over these cases), so the issue's bound of 1e-5 leaves room for
accumulation over layers and chunks without hiding a wrong term (a missing chunk or relay is O(1)).

The repack case: bitsandbytes' CPU path repacks a 4-bit weight for inference on the first forward in eval
mode whose input does not require grad, and every later backward through it gives zero gradients
(`chunkwise.core.quantized`). Every no-grad pass chunkwise runs is checked to leave the weights untouched.
"""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from chunkwise import SeCO, SpaCO  # noqa: E402
from chunkwise.core.batch import chunk_batch  # noqa: E402
from chunkwise.core.handle import inspect_causal_lm  # noqa: E402
from chunkwise.core.inference import chunked_loss_sum, greedy_generate  # noqa: E402
from chunkwise.core.quantized import quantized_4bit_layers  # noqa: E402
from chunkwise.core.reference import ReferenceModel, reference_token_logps  # noqa: E402
from chunkwise.models.loading import add_lora, load_causal_lm  # noqa: E402
from chunkwise.models.quantize import Quantization, check_quantized_training  # noqa: E402
from reference import full_backward, max_relative_error, trainable_grads  # noqa: E402

TOLERANCE = 1e-5
QUANTIZATIONS = {
    "nf4": Quantization(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double": Quantization(load_in_4bit=True, bnb_4bit_use_double_quant=True),
    "int8": Quantization(load_in_8bit=True),
}
REPACKS_ON_THIS_CPU = bool(bnb.functional.has_avx512bf16())


def quantized_lora(preset: str, quantization: Quantization) -> torch.nn.Module:
    """A tiny preset quantized on load, with LoRA (random B, so A's gradient is not trivially zero) on q and v."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_causal_lm(preset, quantization=quantization, dtype=torch.float32)
    model = add_lora(model, rank=4, random_b=0.1, seed=1)
    return model.train()


@pytest.fixture(scope="module", params=[(p, q) for p in ("tiny-llama", "tiny-qwen2") for q in ("nf4", "int8")],
                ids=lambda param: f"{param[0]}-{param[1]}")
def model(request):
    preset, quantization = request.param
    return quantized_lora(preset, QUANTIZATIONS[quantization])


def padded_batch(length: int = 48, pad: int = 11):
    """Two rows `[2, length]`, the second right-padded by `pad`; labels -100 on the padding."""
    input_ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(input_ids)
    mask[1, length - pad:] = 0
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def chunkwise_grads(model, engine, input_ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = engine.backward(input_ids, labels=labels, attention_mask=mask)
    return out.loss, trainable_grads(model)


@pytest.mark.parametrize("chunk_size", [64, 16], ids=["one-chunk", "three-chunks"])
def test_seco_and_spaco_match_full_backprop_through_the_quantized_model(model, chunk_size):
    input_ids, mask, labels = padded_batch()
    loss, reference = full_backward(model, input_ids, labels=labels, attention_mask=mask)
    chunks = -(-input_ids.shape[1] // chunk_size)
    engines = {"SeCO": SeCO(model, chunk_size=chunk_size), "SpaCO": SpaCO(model, chunk_size=chunk_size, budget=chunks, seed=3)}
    for name, engine in engines.items():
        chunk_loss, grads = chunkwise_grads(model, engine, input_ids, mask, labels)
        torch.testing.assert_close(chunk_loss, loss, rtol=TOLERANCE, atol=0.0)
        assert max_relative_error(grads, reference) <= TOLERANCE, name
        assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n), f"{name}: some lora_A gradient is zero"


def quantized_weights(model) -> list[tuple]:
    """Every 4-bit layer's stored bytes and block scales, copied."""
    return [(layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()) for layer in quantized_4bit_layers(model)]


@pytest.mark.parametrize("quantization", ["nf4", "nf4-double", "int8"])
def test_eval_mode_no_grad_passes_leave_the_quantized_base_trainable(quantization):
    """eval() -> every no-grad pass chunkwise runs (held-out eval, probes' generation, reference log-probs,
    SeCO's own stage 1 on an eval-mode model) -> training: gradients still equal full backprop, weights unchanged."""
    model = quantized_lora("tiny-llama", QUANTIZATIONS[quantization])
    input_ids, mask, labels = padded_batch()
    _, reference = full_backward(model, input_ids, labels=labels, attention_mask=mask)
    before = quantized_weights(model)

    model.eval()
    handle = inspect_causal_lm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repack to repair: chunkwise's own passes never repack
        chunked_loss_sum(handle, {"input_ids": input_ids, "labels": labels, "attention_mask": mask}, chunk_size=16)
        greedy_generate(handle, input_ids[:1, :20], chunk_size=8, max_new_tokens=3)
        # A reference pass (DPO / GRPO's KL): the base model (adapter disabled), chunk by chunk, without grad.
        batch = chunk_batch(input_ids, labels=labels, attention_mask=mask, chunk_size=16, vocab_size=128, hidden_size=64,
                            device=input_ids.device)
        reference_token_logps(ReferenceModel(model, model.disable_adapter), batch, chunk_size=16)
        if quantization != "int8":
            # The case: SeCO on an eval-mode 4-bit model (stage 1 is a no-grad forward in eval mode).
            # bitsandbytes' 4-bit layers compute the same in both modes, so the training reference holds.
            _, grads = chunkwise_grads(model, SeCO(model, chunk_size=16), input_ids, mask, labels)
            assert max_relative_error(grads, reference) <= TOLERANCE
    for (data, absmax), (data_before, absmax_before) in zip(quantized_weights(model), before):
        assert torch.equal(data, data_before) and torch.equal(absmax, absmax_before)

    model.train()
    _, grads = chunkwise_grads(model, SeCO(model, chunk_size=16), input_ids, mask, labels)
    assert max_relative_error(grads, reference) <= TOLERANCE


@pytest.mark.skipif(not REPACKS_ON_THIS_CPU, reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_a_repack_done_outside_chunkwise_is_undone_with_a_warning():
    """The user's own eval-mode forward without grad repacks every 4-bit layer (lossy: bfloat16 block scales);
    the engine puts the training layout back, says so, and its gradient equals full backprop through the model
    as it now is. Without the repair every LoRA gradient would be exactly zero."""
    model = quantized_lora("tiny-llama", QUANTIZATIONS["nf4"])
    input_ids, mask, labels = padded_batch()
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    layers = quantized_4bit_layers(model)
    assert layers and all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)

    with pytest.warns(UserWarning, match=r"14 4-bit layers had been repacked by bitsandbytes"):
        _, grads = chunkwise_grads(model, SeCO(model, chunk_size=16), input_ids, mask, labels)
    assert not any(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    model.train()
    _, reference = full_backward(model, input_ids, labels=labels, attention_mask=mask)
    assert max_relative_error(grads, reference) <= TOLERANCE
    assert all(g.abs().max() > 0 for g in grads.values())


def test_a_full_fine_tune_of_a_quantized_base_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^--load-in-4bit freezes the base in 4-bit weights.*--lora-r N") as error:
        check_quantized_training(QUANTIZATIONS["nf4"], lora_rank=None)
    assert "\n" not in str(error.value)
    check_quantized_training(QUANTIZATIONS["nf4"], lora_rank=8)
    check_quantized_training(Quantization(), lora_rank=None)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), "exclude each other"),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "nf4, fp4"),
        (dict(load_in_8bit=True, bnb_4bit_use_double_quant=True), "add --load-in-4bit"),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype="float64"), "float32, bfloat16, float16"),
    ],
)
def test_inconsistent_quantization_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Quantization(**options)


def test_compute_dtype_follows_the_precision_unless_given():
    nf4 = QUANTIZATIONS["nf4"]
    assert nf4.compute_dtype(torch.float32, None) == torch.float32
    assert nf4.compute_dtype(torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert Quantization(load_in_4bit=True, bnb_4bit_compute_dtype="float16").compute_dtype(torch.float32, None) == torch.float16
    with pytest.raises(ValueError, match="not float64"):
        nf4.compute_dtype(torch.float64, None)
    model = quantized_lora("tiny-llama", QUANTIZATIONS["nf4"])
    layer = quantized_4bit_layers(model)[0]
    assert layer.compute_dtype == torch.float32 and layer.weight.quant_type == "nf4"


def test_verify_compares_against_a_reference_the_repack_does_not_zero():
    """`chunkwise verify` runs both passes in eval mode; its full-backprop reference has an input without grad
    at the first layer, which would repack a 4-bit base and zero the reference."""
    from chunkwise.recipes.verify import compare_gradients

    model = quantized_lora("tiny-qwen2", QUANTIZATIONS["nf4"])
    report = compare_gradients(model, seq_len=48, chunk_size=16)
    assert report.max_rel <= TOLERANCE
    assert all(p.grad.abs().max() > 0 for n, p in model.named_parameters() if p.requires_grad)


def test_an_adapter_trained_on_a_4bit_base_loads_on_the_quantized_base_and_on_the_unquantized_one(tmp_path):
    from chunkwise.recipes.run import load_trained_model

    base_folder = tmp_path / "base"
    load_causal_lm("tiny-llama").save_pretrained(base_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = add_lora(load_causal_lm(str(base_folder), quantization=QUANTIZATIONS["nf4"]), rank=4, random_b=0.1, seed=1)
    input_ids, mask, labels = padded_batch()
    SeCO(model, chunk_size=16).backward(input_ids, labels=labels, attention_mask=mask)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.5 * p.grad
    model.save_pretrained(tmp_path / "adapter")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    for quantization in (QUANTIZATIONS["nf4"], Quantization()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded, _, _ = load_trained_model(str(tmp_path / "adapter"), quantization=quantization)
        assert bool(quantized_4bit_layers(loaded)) == quantization.enabled
        adapter = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
        assert adapter.keys() == trained.keys() and all(torch.equal(adapter[n], trained[n]) for n in trained)
        with torch.no_grad():
            logits = loaded(input_ids=input_ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("quantization", ["nf4", "nf4-double", "int8"])
def test_planned_weight_bytes_equal_what_bitsandbytes_stores(quantization):
    """`Quantization.weight_bytes` per layer, summed over the linears transformers quantizes, against the bytes
    of every quantized layer's weight and quantization state as loaded."""
    from chunkwise.models.quantize import quantized_linears
    from chunkwise.plan import ModelShape

    options = QUANTIZATIONS[quantization]
    model = quantized_lora("tiny-llama", options)
    stored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors = [module.weight.data, state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if state.nested else [])
            stored += sum(t.numel() * t.element_size() for t in tensors)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            stored += sum(t.numel() * t.element_size() for t in (module.weight.data, module.weight.SCB))
    linears = quantized_linears(ModelShape.from_name("tiny-llama").linears)
    planned = sum(options.weight_bytes(outputs, inputs) for _, inputs, outputs in linears)
    assert planned == stored
