"""Finding the causal LM inside what the user hands us, and checking it can run chunk-wise.

The engine talks to a model only through the standard `transformers` call with our own `Cache`
(DESIGN.md §3). This module answers the questions that call depends on — where is the Hugging Face
causal LM (a PEFT wrapper may hide it), which keyword takes the cache, is the model causal — and turns
every "no" into an error that names the model and says what to do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class CausalLMHandle:
    """What the engine needs to know about a model.

    Attributes:
        lm: the Hugging Face `*ForCausalLM` module (PEFT adapters, if any, are injected into it in place,
            so calling it runs them).
        decoder: the transformer body of `lm` (everything but the LM head); stage 1 calls only this.
        cache_kwarg: the keyword under which `lm` and `decoder` take a `Cache` (`cache` in recent
            transformers releases, `past_key_values` in older 5.x ones).
        vocab_size: number of rows of the output embedding; token ids must be below it.
        hidden_size: width of the input embeddings; `inputs_embeds` must end in it.

    A data-parallel wrapper around the model (DDP, a DeepSpeed engine, FSDP2) is the business of
    `chunkwise.core.sync`, which the engine asks how to call a chunk and when gradients are reduced.
    """

    lm: PreTrainedModel
    decoder: torch.nn.Module
    cache_kwarg: str
    vocab_size: int
    hidden_size: int


def _is_deepspeed_engine(model: torch.nn.Module) -> bool:
    # By class name, so that checking a model never imports deepspeed (slow, and an optional dependency).
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def unwrap_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """Return the Hugging Face model inside `model` (DDP, DeepSpeed engine and PEFT wrappers are looked through;
    a model sharded with FSDP2's `fully_shard` is the model itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or _is_deepspeed_engine(model):
        model = model.module
    wrapper = type(model).__name__
    if wrapper == "FullyShardedDataParallel" or hasattr(model, "_fsdp_wrapped_module"):
        raise TypeError(
            "chunkwise cannot train through FSDP1's FullyShardedDataParallel wrapper: it hides the model's own "
            "modules, which chunk-wise training calls chunk by chunk. Shard with FSDP2 instead: "
            "torch.distributed.fsdp.fully_shard on each decoder layer, then on the model (accelerate: "
            "fsdp_version: 2)."
        )
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and not isinstance(model, PreTrainedModel):
        model = get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"chunkwise needs a Hugging Face transformers causal LM (or a PEFT model wrapping one); got "
            f"{type(model).__name__}. Load it with AutoModelForCausalLM.from_pretrained(...)."
        )
    return model


def _cache_keyword(module: torch.nn.Module) -> str | None:
    """Name of the forward() argument that takes a `Cache`, or None if there is none."""
    parameters = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def inspect_causal_lm(model: torch.nn.Module) -> CausalLMHandle:
    """Check that `model` is a decoder-only causal LM that accepts a `Cache`, and describe it.

    Raises:
        TypeError: with the model's class name and the reason, when it cannot be trained chunk-wise.
    """
    lm = unwrap_causal_lm(model)
    name = type(lm).__name__
    config = lm.config
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{name} is an encoder-decoder model; chunk-wise training needs a decoder-only causal LM "
            "(its KV cache is what carries the context from chunk to chunk)."
        )
    if not getattr(config, "is_causal", True) or not lm.can_generate():
        raise TypeError(
            f"{name} is not a causal language model (it cannot generate text). Load the model with "
            "AutoModelForCausalLM.from_pretrained(...) to get its *ForCausalLM class."
        )
    if lm.get_output_embeddings() is None:
        raise TypeError(f"{name} has no LM head (get_output_embeddings() is None); use its *ForCausalLM class.")
    decoder = lm.get_decoder()
    cache_kwarg = _cache_keyword(lm)
    if cache_kwarg is None or _cache_keyword(decoder) != cache_kwarg:
        raise TypeError(
            f"{name} does not accept a transformers Cache in forward(), so its KV cache cannot be carried "
            "between chunks. chunkwise supports models whose forward() takes `cache` (or `past_key_values`)."
        )
    # ZeRO-3 leaves each rank a flat shard of every weight; `ds_shape` is the weight's own shape.
    vocab_size = getattr(lm.get_output_embeddings().weight, "ds_shape", lm.get_output_embeddings().weight.shape)[0]
    hidden_size = getattr(lm.get_input_embeddings().weight, "ds_shape", lm.get_input_embeddings().weight.shape)[1]
    return CausalLMHandle(lm, decoder, cache_kwarg, vocab_size, hidden_size)


# ---------------------------------------------------------------------------------------------------
# Tiny presets: randomly initialised models built from configs, for trying things out and for tests.
