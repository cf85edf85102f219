"""Which models chunkwise accepts, the errors for the others, and loading from local directories."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from chunkwise import SeCO
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.models.loading import load_causal_lm
from chunkwise.models.presets import TINY_PRESETS, build_tiny_model


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_presets_are_accepted(preset):
    handle = inspect_causal_lm(build_tiny_model(preset))
    assert handle.cache_kwarg == "cache" and handle.vocab_size == 128


def test_peft_wrapper_is_looked_through():
    base = build_tiny_model("tiny-llama")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    handle = inspect_causal_lm(peft_model)
    assert handle.lm is base and handle.decoder is base.model


def test_not_a_transformers_model():
    with pytest.raises(TypeError, match="needs a Hugging Face transformers causal LM.*got Linear"):
        SeCO(torch.nn.Linear(2, 2), chunk_size=4)


def test_encoder_decoder_is_refused():
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        SeCO(T5ForConditionalGeneration(config), chunk_size=4)


def test_masked_lm_is_refused():
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(TypeError, match="BertForMaskedLM is not a causal language model"):
        SeCO(BertForMaskedLM(config), chunk_size=4)


class NoCacheLM(LlamaForCausalLM):
    """A causal LM whose forward() takes no cache: nothing can carry the context between chunks."""

    def forward(self, input_ids=None, labels=None):
        return super().forward(input_ids=input_ids, labels=labels)


def test_model_without_cache_argument_is_refused():
    config = build_tiny_model("tiny-llama").config
    with pytest.raises(TypeError, match="NoCacheLM does not accept a transformers Cache"):
        SeCO(NoCacheLM(config), chunk_size=4)


def test_load_from_local_directory(tmp_path):
    original = build_tiny_model("tiny-qwen2", seed=3)
    original.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(str(tmp_path / "tiny"), dtype=torch.float64)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert next(loaded.parameters()).dtype == torch.float64
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a.double(), b, msg=name)


def test_missing_local_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))


def test_fsdp1_wrapper_is_refused_with_the_fix():
    class FullyShardedDataParallel(torch.nn.Module):  # FSDP1's wrapper, by name (it needs a process group to build)
        def __init__(self, module):
            super().__init__()
            self._fsdp_wrapped_module = module

    with pytest.raises(TypeError, match="FSDP1's FullyShardedDataParallel.*fully_shard"):
        inspect_causal_lm(FullyShardedDataParallel(build_tiny_model("tiny-llama")))
