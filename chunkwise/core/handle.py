"""Finding the causal LM inside what the user hands us, checking it can run chunk-wise, and tiny presets.

The engine talks to a model only through the standard `transformers` call with our own `Cache`
(DESIGN.md §3). This module answers the questions that call depends on — where is the Hugging Face
causal LM (a PEFT wrapper may hide it), which keyword takes the cache, is the model causal — and turns
every "no" into an error that names the model and says what to do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

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
    `chunkwise.parallel`, which the engine asks how to call a chunk and when gradients are reduced.
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
# Nothing is downloaded. Each keeps the architecture's distinguishing feature (GQA, sliding window,
# q/k norms, alternating local/global layers) at toy size.
# ---------------------------------------------------------------------------------------------------

_TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def _tiny_config(preset: str):
    """Build the config of a tiny preset; imports are local so unused architectures cost nothing."""
    if preset == "tiny-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**_TINY_COMMON)
    if preset == "tiny-qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**_TINY_COMMON)
    if preset == "tiny-qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**_TINY_COMMON, head_dim=16)
    if preset == "tiny-mistral":
        from transformers import MistralConfig

        # A window shorter than the test sequences, so the sliding-window mask matters.
        return MistralConfig(**_TINY_COMMON, sliding_window=8)
    if preset == "tiny-gemma3":
        from transformers import Gemma3TextConfig

        # Alternating sliding (window 8) and global layers, as in Gemma 3.
        common = {**_TINY_COMMON, "num_hidden_layers": 2}
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if preset == DEMO_MODEL:
        return demo_config()
    raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")


TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma3")
# The built-in demo's model (`chunkwise train` without --model): built like a preset, vocabulary of the
# synthetic task.
DEMO_MODEL = "demo-llama"


def demo_config():
    """The built-in demo's model: a small Llama over the synthetic task's word-level vocabulary.

    Long position range on purpose: `chunkwise eval` scores it on 32K-token documents.
    """
    from transformers import LlamaConfig

    from .data import DEMO_TASK

    # Tuned for the demo (see docs/demo.md): one layer of four heads learns the task reliably in 400 steps;
    # a large rope_theta keeps attention to the far start of the sequence easy to learn.
    return LlamaConfig(
        vocab_size=DEMO_TASK.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model(preset: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (2 layers, hidden 64, vocab 128) from a named preset.

    Weights are drawn in float32 and then cast, so a preset and seed give the same model in any dtype.
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)


def _local_model_path(name_or_path: str) -> Path | None:
    """The folder `name_or_path` names, None for a hub id; FileNotFoundError for a path that does not exist.

    A name that starts like a path (`.`, `/`, `~`) or exists on disk is a path, whatever else it looks like.
    """
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()
    if not looks_local:
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"model path {name_or_path!r} {what}; give a directory saved with save_pretrained(), "
            f"a hub id, or one of the tiny presets: {', '.join(TINY_PRESETS)}"
        )
    return path


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """Load a causal LM from a tiny preset name, a local directory, or a Hugging Face hub id."""
    if name_or_path in (*TINY_PRESETS, DEMO_MODEL):
        return build_tiny_model(name_or_path, dtype=dtype, seed=seed)
    from transformers import AutoModelForCausalLM

    local = _local_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(str(local) if local else name_or_path, dtype=dtype)


def load_model_config(name_or_path: str):
    """The config of `load_causal_lm(name_or_path)`, read without loading any weight.

    A preset's config is built; a folder's is its `config.json` (a LoRA adapter folder's is its base
    model's, named in `adapter_config.json`); a hub id's comes from the hub (or its local cache).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder without a config, or a config that cannot be read; the message says which.
    """
    if name_or_path in (*TINY_PRESETS, DEMO_MODEL):
        return _tiny_config(name_or_path)
    from transformers import AutoConfig

    local = _local_model_path(name_or_path)
    if local is not None and not (local / "config.json").is_file():
        adapter = local / "adapter_config.json"
        if adapter.is_file():
            import json

            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            if base:
                return load_model_config(base)
        raise ValueError(f"{name_or_path} has no config.json: it is not a model folder saved with save_pretrained()")
    try:
        return AutoConfig.from_pretrained(str(local) if local else name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read the config of {name_or_path} ({str(error).splitlines()[0]})") from None


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with `load_causal_lm(name_or_path)`: the synthetic task's for the demo
    model, none for the tiny presets, else `AutoTokenizer` from the same folder or hub id."""
    if name_or_path == DEMO_MODEL:
        from .data import DEMO_TASK

        return DEMO_TASK.tokenizer()
    if name_or_path in TINY_PRESETS:
        return None
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path)


def check_position_limit(model_config, length: int, *, allow: bool, option: str = "--seq-len", log=print) -> None:
    """Refuse (or, if allowed, warn about) sequences beyond the model's trained position range."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None or length <= limit:
        return
    message = f"{option} {length} is above the model's position limit max_position_embeddings={limit}"
    if not allow:
        raise ValueError(f"{message}; lower it, or pass --allow-extrapolation to go beyond it knowingly")
    log(f"warning: {message}; positions past {limit} are extrapolated (--allow-extrapolation)")


# ----- device and precision -----------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU; other names as torch reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return device


PRECISIONS = ("auto", "float32", "bfloat16", "float16", "float64")


def training_dtypes(precision: str, device: torch.device, *, frozen_base: bool = False):
    """`(weights dtype, autocast dtype or None)` for a precision name.

    "auto" is bfloat16 on a GPU that supports it, float32 otherwise. bfloat16/float16 are autocast with
    float32 weights (the optimizer updates float32 master weights), except frozen base weights under
    LoRA, which are stored in the low precision to halve their memory (the adapter stays float32).
    "float64" is for exactness checks: float64 weights, no autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if precision in ("float32", "float64"):
        return getattr(torch, precision), None
    low = getattr(torch, precision)
    return (low if frozen_base else torch.float32), low
