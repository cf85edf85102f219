"""Models built from configs, nothing downloaded: tiny presets for tests and trying things out, the demo's model,
and the benchmark's Llama-shaped models (`BENCH_MODELS`, built by `chunkwise bench`).

Each tiny preset keeps the architecture's distinguishing feature (GQA, sliding window, q/k norms,
alternating local/global layers) at toy size.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from chunkwise.models.names import DEMO_MODEL, TINY_PRESETS

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


def tiny_config(preset: str):
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


def demo_config():
    """The built-in demo's model: a small Llama over the synthetic task's word-level vocabulary.

    Long position range on purpose: `chunkwise eval` scores it on 32K-token documents.
    """
    from transformers import LlamaConfig

    from chunkwise.data.synthetic import DEMO_TASK

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


def preset_config(name: str, *, vocab_size: int | None = None):
    """The config of any preset: a tiny one, the demo's model or a `BENCH_MODELS` entry; `vocab_size` replaces
    its vocabulary (a tiny preset reading text with the byte tokenizer needs 264 ids, not 128)."""
    config = bench_config(name) if name in BENCH_MODELS else tiny_config(name)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def build_tiny_model(preset: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a named preset (`preset_config`; a tiny one: 2 layers, hidden 64,
    vocab 128 unless `vocab_size` says otherwise).

    Weights are drawn in float32 and then cast, so a preset and seed give the same model in any dtype.
    """
    from transformers import AutoModelForCausalLM

    config = preset_config(preset, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)


# ----- benchmark models (`chunkwise bench`, the GPU suite, docs/plan_validation.py) ------------------------
# Llama-shaped configs with random weights: nothing is downloaded, and a step costs the same whatever the
# weights are. Parameter counts are for untied embeddings unless tie_word_embeddings says otherwise.

_LLAMA_COMMON = dict(max_position_embeddings=131072, tie_word_embeddings=False)
BENCH_MODELS: dict[str, dict] = {
    # `--quick`: ~0.9M parameters, so that the whole quick run and the tests take seconds per case.
    "quick": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **_LLAMA_COMMON,
    ),
    # The quick model at Llama's head size (4 heads of 64): attention is most of a long step's work, as in
    # larger models at long lengths; the packed-rows benchmark (docs/benchmarks.md) measures 32K rows on it.
    "quick-wide": dict(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **_LLAMA_COMMON,
    ),
    # The CPU default: 55,976,448 parameters (32.8M of them in the untied embedding and LM head).
    "llama-56m": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, **_LLAMA_COMMON,
    ),
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings), without its llama3 RoPE scaling, which
    # changes the frequencies but not the cost.
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        **{**_LLAMA_COMMON, "tie_word_embeddings": True},
    ),
    # Llama-3.1-8B's shape (8.03B parameters), for a GPU.
    "llama-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, **_LLAMA_COMMON,
    ),
}


def bench_config(name: str):
    """The `LlamaConfig` of the `BENCH_MODELS` entry `name`."""
    from transformers import LlamaConfig

    if name not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {name!r}; choose one of {', '.join(BENCH_MODELS)}")
    return LlamaConfig(**BENCH_MODELS[name])


PRESETS = (*TINY_PRESETS, DEMO_MODEL, *BENCH_MODELS)
"""Every name `load_causal_lm` builds from a config in this package, with random weights: nothing is downloaded."""
