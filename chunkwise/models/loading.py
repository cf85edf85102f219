"""Loading what the user names: a tiny preset, a folder saved with `save_pretrained`, or a hub id; and LoRA."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from chunkwise.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from chunkwise.models.known import known_config
from chunkwise.models.names import local_model_path as _local_model_path
from chunkwise.models.presets import DEMO_MODEL, PRESETS, TINY_PRESETS, build_tiny_model, preset_config
from chunkwise.models.quantize import NO_QUANTIZATION, Quantization


OFFLINE_EXAMPLES = ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-v0.1")


def preset_text_vocab(name: str) -> int | None:
    """The vocabulary a preset is built with when it reads text with its byte tokenizer: `BYTE_VOCAB_SIZE` (264)
    for the tiny presets, whose 128 ids are too few for 256 bytes; None for the others (their own ids suffice)."""
    return BYTE_VOCAB_SIZE if name in TINY_PRESETS else None


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   quantization: Quantization = NO_QUANTIZATION, compute_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", vocab_size: int | None = None) -> PreTrainedModel:
    """Load a causal LM from a preset name (`PRESETS`: tiny, demo, bench), a local directory, or a Hugging Face hub id.

    Args:
        dtype: the dtype of the weights (of those left unquantized, with `quantization`).
        quantization: quantize the base's linear layers on load (bitsandbytes); the model is then loaded
            straight onto `device` (a quantized model cannot move afterwards) and frozen: add LoRA to train it.
        compute_dtype: what a quantized layer computes in (default `dtype`); see `Quantization.compute_dtype`.
        device: where a quantized model is loaded (an unquantized one loads on the CPU; the caller moves it).
        vocab_size: a preset's vocabulary instead of its own (`preset_text_vocab`); ignored for other models.
    """
    if quantization.enabled:
        return _load_quantized(name_or_path, dtype=dtype, seed=seed, quantization=quantization,
                               compute_dtype=compute_dtype or dtype, device=device, vocab_size=vocab_size)
    if name_or_path in PRESETS:
        return build_tiny_model(name_or_path, dtype=dtype, seed=seed, vocab_size=vocab_size)
    from transformers import AutoModelForCausalLM

    local = _local_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(str(local) if local else name_or_path, dtype=dtype)


def _load_quantized(name_or_path: str, *, dtype, seed, quantization: Quantization, compute_dtype, device, vocab_size=None) -> PreTrainedModel:
    """`from_pretrained` with a `BitsAndBytesConfig`; a preset is saved to a temporary folder first (transformers
    quantizes while it loads a checkpoint)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    config = quantization.bitsandbytes_config(compute_dtype)  # ImportError with the fix when bitsandbytes is missing
    place = {"device_map": {"": str(device)}, "quantization_config": config, "dtype": dtype}
    if name_or_path in PRESETS:
        with tempfile.TemporaryDirectory(prefix="chunkwise-preset-") as folder:
            build_tiny_model(name_or_path, dtype=dtype, seed=seed, vocab_size=vocab_size).save_pretrained(folder)
            return AutoModelForCausalLM.from_pretrained(folder, **place)
    local = _local_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(str(local) if local else name_or_path, **place)


def load_model_config(name_or_path: str):
    """The config of `load_causal_lm(name_or_path)`, read without loading any weight.

    A preset's config is built; a folder's is its `config.json` (a LoRA adapter folder's is its base
    model's, named in `adapter_config.json`); a well-known hub id's (`KNOWN_CONFIGS`: Llama 3.x, Qwen 2.5 / 3,
    Mistral 7B, Gemma 3) is built from the table, with no request; another hub id's comes from the hub (or its
    local cache).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder without a config, or a config that cannot be read; the message says which.
    """
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    from transformers import AutoConfig

    local = _local_model_path(name_or_path)
    known = None if local is not None else known_config(name_or_path)
    if known is not None:
        return known
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
        hint = "" if local is not None else (
            "; without the network, pass a local folder holding its config.json (--model /path/to/folder), or a hub id "
            f"chunkwise knows offline (e.g. {', '.join(OFFLINE_EXAMPLES)}; all in chunkwise/models/known.py)")
        raise ValueError(f"cannot read the config of {name_or_path} ({str(error).splitlines()[0]}){hint}") from None


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with `load_causal_lm(name_or_path)`: the synthetic task's for the demo
    model, the byte tokenizer (`chunkwise.models.byte_tokenizer`) for the other presets, else `AutoTokenizer`
    from the same folder or hub id."""
    if name_or_path == DEMO_MODEL:
        from chunkwise.data.synthetic import DEMO_TASK

        return DEMO_TASK.tokenizer()
    if name_or_path in PRESETS:
        return byte_tokenizer()
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


DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def add_lora(model: PreTrainedModel, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
             targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS, random_b: float = 0.0, seed: int = 0,
             option: str = "LoRA targets"):
    """Wrap `model` in a peft LoRA adapter; only the adapter's weights train.

    Args:
        rank: LoRA rank r.
        alpha: scaling numerator (default 2 × rank, as in the paper).
        targets: names of the linear layers that get an adapter.
        random_b: if non-zero, lora_B is drawn as `random_b * N(0, 1)` from a generator seeded `seed`
            instead of peft's zeros. With B = 0, A's gradient is exactly zero and a gradient check of it
            proves nothing (`chunkwise verify`, the tests).
    Raises:
        ValueError: a target that matches no layer of the model: `option` (the flag that named them), the
            targets and peft's reason.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout, target_modules=list(targets))
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"{option} {','.join(targets)!r}: {str(error).splitlines()[0]}") from None
    if random_b:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(random_b * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model
