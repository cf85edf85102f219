"""The planner with a quantized base: weight bytes equal what bitsandbytes stores, the dequantization workspace is
counted, a full fine-tune is refused; `chunkwise plan --load-in-4bit` prints the longest lengths."""

from __future__ import annotations

import json
import warnings

import pytest

from chunkwise.cli.main import main
from chunkwise.models.quantize import Quantization
from chunkwise.plan import ModelShape, PlanError, Training, method_plan

NF4 = Quantization(load_in_4bit=True)


def test_weights_part_equals_the_loaded_quantized_model_with_lora():
    bnb = pytest.importorskip("bitsandbytes")
    from chunkwise.models.loading import add_lora, load_causal_lm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = add_lora(load_causal_lm("tiny-llama", quantization=NF4), rank=8)
    stored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            stored += sum(t.numel() * t.element_size() for t in (module.weight.data, state.absmax, state.code))
    stored += sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    training = Training.from_precision("float32", device_type="cpu", lora_r=8, quantization=NF4)
    plan = method_plan(ModelShape.from_name("tiny-llama"), training, "seco", seq_len=64, chunk_size=16)
    assert plan.parts["weights"] == stored
    # One decoder MLP weight (128 x 64), dequantized to float32 for its matmul.
    assert plan.parts["dequantization"] == 128 * 64 * 4


def test_quantized_weights_are_a_fraction_and_the_rest_is_unchanged():
    shape = ModelShape.from_name("tiny-qwen3")
    plain = method_plan(shape, Training.from_precision("bfloat16", device_type="cuda", lora_r=8), "seco", seq_len=512, chunk_size=64)
    quantized = method_plan(shape, Training.from_precision("bfloat16", device_type="cuda", lora_r=8, quantization=NF4), "seco",
                            seq_len=512, chunk_size=64)
    assert quantized.parts["weights"] < plain.parts["weights"]
    for part in ("kv_cache", "kv_gradient", "gradients", "optimizer"):
        assert quantized.parts.get(part) == plain.parts.get(part), part


def test_a_full_fine_tune_of_a_quantized_base_is_a_plan_error():
    with pytest.raises(PlanError, match="--load-in-8bit freezes the base"):
        Training.from_precision("float32", device_type="cpu", lora_r=0, quantization=Quantization(load_in_8bit=True))


def test_chunkwise_plan_load_in_4bit_gives_longer_lengths(capsys):
    lengths = {}
    for extra in ([], ["--load-in-4bit", "--bnb-4bit-use-double-quant"]):
        assert main(["plan", "--model", "tiny-llama", "--device", "cuda", "--memory", "64MiB", "--json", *extra]) == 0
        report = json.loads(capsys.readouterr().out)
        lengths[bool(extra)] = report["longest"]["seco"]["seq_len"]
    assert lengths[True] > lengths[False]
    assert main(["plan", "--model", "tiny-llama", "--load-in-4bit", "--lora-r", "0", "--seq-len", "64"]) == 2
    assert "--load-in-4bit freezes the base" in capsys.readouterr().err
