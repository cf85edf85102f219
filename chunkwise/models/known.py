"""The configs of well-known hub models, written into the package so that `chunkwise plan` needs no network.

Each entry is keyed by its hub id and holds the fields of that repository's published `config.json` that
decide the memory a step takes (the shape, the vocabulary, the position range, tied embeddings, sliding
windows, RoPE scaling); `load_model_config` builds the transformers config from it without a request. Weights
still come from the hub (or its cache) when a model is trained; only the planning is offline.

Gemma 3 4B / 12B / 27B are published as image-text models (`Gemma3ForConditionalGeneration`): the entries
are their text decoders (`text_config`), which is what trains on text; the ~0.4B-parameter vision tower is
not counted.
"""

from __future__ import annotations

# Llama 3.1 / 3.2: RoPE theta 500000 with the "llama3" scaling to 128K positions (factor 8 for 3.1, 32 for 3.2).
def _llama3(hidden: int, layers: int, heads: int, intermediate: int, *, tie: bool, factor: float) -> dict:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                intermediate_size=intermediate, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=tie,
                rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))


# Qwen 2.5: biased q/k/v, RoPE theta 1e6; the sliding window in their configs is switched off (use_sliding_window false).
def _qwen25(hidden: int, layers: int, heads: int, kv: int, intermediate: int, *, vocab: int, tie: bool, positions: int) -> dict:
    return dict(model_type="qwen2", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=positions, tie_word_embeddings=tie,
                rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)


# Qwen 3: q/k norms, head_dim 128 whatever the width, 40960 positions, RoPE theta 1e6.
def _qwen3(hidden: int, layers: int, heads: int, intermediate: int, *, tie: bool) -> dict:
    return dict(model_type="qwen3", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                head_dim=128, intermediate_size=intermediate, vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=tie,
                rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)


# Mistral 7B: v0.1 has a 4096-token sliding window and a 32000 vocabulary; v0.2 and v0.3 (32768 ids) attend fully.
def _mistral7b(*, vocab: int, window: int | None, theta: float) -> dict:
    return dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=vocab, max_position_embeddings=32768, tie_word_embeddings=False,
                rms_norm_eps=1e-5, rope_theta=theta, sliding_window=window, bos_token_id=1, eos_token_id=2)


# Gemma 3: five sliding-window layers (local RoPE theta 1e4) per global one (theta 1e6), tied embeddings.
def _gemma3(hidden: int, layers: int, heads: int, kv: int, head_dim: int, intermediate: int, *, window: int, positions: int,
            vocab: int, scalar: int, scaling: dict | None) -> dict:
    return dict(model_type="gemma3_text", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=positions, tie_word_embeddings=True, sliding_window=window, sliding_window_pattern=6,
                query_pre_attn_scalar=scalar, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=scaling,
                rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)


_GEMMA_LINEAR_8 = dict(rope_type="linear", factor=8.0)

KNOWN_CONFIGS: dict[str, dict] = {
    # hub id (its config.json): fields
    "meta-llama/Llama-3.2-1B": _llama3(2048, 16, 32, 8192, tie=True, factor=32.0),
    "meta-llama/Llama-3.2-1B-Instruct": _llama3(2048, 16, 32, 8192, tie=True, factor=32.0),
    "meta-llama/Llama-3.2-3B": _llama3(3072, 28, 24, 8192, tie=True, factor=32.0),
    "meta-llama/Llama-3.2-3B-Instruct": _llama3(3072, 28, 24, 8192, tie=True, factor=32.0),
    "meta-llama/Llama-3.1-8B": _llama3(4096, 32, 32, 14336, tie=False, factor=8.0),
    "meta-llama/Llama-3.1-8B-Instruct": _llama3(4096, 32, 32, 14336, tie=False, factor=8.0),
    "meta-llama/Meta-Llama-3.1-8B": _llama3(4096, 32, 32, 14336, tie=False, factor=8.0),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _llama3(4096, 32, 32, 14336, tie=False, factor=8.0),
    "meta-llama/Llama-3.1-70B": _llama3(8192, 80, 64, 28672, tie=False, factor=8.0),
    "meta-llama/Llama-3.1-70B-Instruct": _llama3(8192, 80, 64, 28672, tie=False, factor=8.0),
    "meta-llama/Llama-3.3-70B-Instruct": _llama3(8192, 80, 64, 28672, tie=False, factor=8.0),
    "Qwen/Qwen2.5-0.5B": _qwen25(896, 24, 14, 2, 4864, vocab=151936, tie=True, positions=32768),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(896, 24, 14, 2, 4864, vocab=151936, tie=True, positions=32768),
    "Qwen/Qwen2.5-1.5B": _qwen25(1536, 28, 12, 2, 8960, vocab=151936, tie=True, positions=131072),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(1536, 28, 12, 2, 8960, vocab=151936, tie=True, positions=32768),
    "Qwen/Qwen2.5-3B": _qwen25(2048, 36, 16, 2, 11008, vocab=151936, tie=True, positions=32768),
    "Qwen/Qwen2.5-3B-Instruct": _qwen25(2048, 36, 16, 2, 11008, vocab=151936, tie=True, positions=32768),
    "Qwen/Qwen2.5-7B": _qwen25(3584, 28, 28, 4, 18944, vocab=152064, tie=False, positions=131072),
    "Qwen/Qwen2.5-7B-Instruct": _qwen25(3584, 28, 28, 4, 18944, vocab=152064, tie=False, positions=32768),
    "Qwen/Qwen2.5-14B": _qwen25(5120, 48, 40, 8, 13824, vocab=152064, tie=False, positions=131072),
    "Qwen/Qwen2.5-14B-Instruct": _qwen25(5120, 48, 40, 8, 13824, vocab=152064, tie=False, positions=32768),
    "Qwen/Qwen2.5-32B": _qwen25(5120, 64, 40, 8, 27648, vocab=152064, tie=False, positions=131072),
    "Qwen/Qwen2.5-32B-Instruct": _qwen25(5120, 64, 40, 8, 27648, vocab=152064, tie=False, positions=32768),
    "Qwen/Qwen2.5-72B": _qwen25(8192, 80, 64, 8, 29568, vocab=152064, tie=False, positions=131072),
    "Qwen/Qwen2.5-72B-Instruct": _qwen25(8192, 80, 64, 8, 29568, vocab=152064, tie=False, positions=32768),
    "Qwen/Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, tie=True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, tie=True),
    "Qwen/Qwen3-4B": _qwen3(2560, 36, 32, 9728, tie=True),
    "Qwen/Qwen3-8B": _qwen3(4096, 36, 32, 12288, tie=False),
    "Qwen/Qwen3-14B": _qwen3(5120, 40, 40, 17408, tie=False),
    "Qwen/Qwen3-32B": _qwen3(5120, 64, 64, 25600, tie=False),
    "mistralai/Mistral-7B-v0.1": _mistral7b(vocab=32000, window=4096, theta=10000.0),
    "mistralai/Mistral-7B-Instruct-v0.1": _mistral7b(vocab=32000, window=4096, theta=10000.0),
    "mistralai/Mistral-7B-Instruct-v0.2": _mistral7b(vocab=32000, window=None, theta=1000000.0),
    "mistralai/Mistral-7B-v0.3": _mistral7b(vocab=32768, window=None, theta=1000000.0),
    "mistralai/Mistral-7B-Instruct-v0.3": _mistral7b(vocab=32768, window=None, theta=1000000.0),
    "google/gemma-3-1b-pt": _gemma3(1152, 26, 4, 1, 256, 6912, window=512, positions=32768, vocab=262144, scalar=256, scaling=None),
    "google/gemma-3-1b-it": _gemma3(1152, 26, 4, 1, 256, 6912, window=512, positions=32768, vocab=262144, scalar=256, scaling=None),
    "google/gemma-3-4b-pt": _gemma3(2560, 34, 8, 4, 256, 10240, window=1024, positions=131072, vocab=262208, scalar=256, scaling=_GEMMA_LINEAR_8),
    "google/gemma-3-4b-it": _gemma3(2560, 34, 8, 4, 256, 10240, window=1024, positions=131072, vocab=262208, scalar=256, scaling=_GEMMA_LINEAR_8),
    "google/gemma-3-12b-pt": _gemma3(3840, 48, 16, 8, 256, 15360, window=1024, positions=131072, vocab=262208, scalar=256, scaling=_GEMMA_LINEAR_8),
    "google/gemma-3-12b-it": _gemma3(3840, 48, 16, 8, 256, 15360, window=1024, positions=131072, vocab=262208, scalar=256, scaling=_GEMMA_LINEAR_8),
    "google/gemma-3-27b-pt": _gemma3(5376, 62, 32, 16, 128, 21504, window=1024, positions=131072, vocab=262208, scalar=168, scaling=_GEMMA_LINEAR_8),
    "google/gemma-3-27b-it": _gemma3(5376, 62, 32, 16, 128, 21504, window=1024, positions=131072, vocab=262208, scalar=168, scaling=_GEMMA_LINEAR_8),
}
# Qwen3's post-trained checkpoints and their -Base ones (published for 0.6B to 14B) share a shape.
KNOWN_CONFIGS.update({f"{name}-Base": KNOWN_CONFIGS[name] for name in
                      ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B")})


def known_config(name: str):
    """The transformers config of the well-known hub id `name` (see KNOWN_CONFIGS), built with no request; None
    for a name that is not in the table. Matching ignores case, as the hub's ids do."""
    fields = _KNOWN_LOWER.get(name.lower())
    if fields is None:
        return None
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


_KNOWN_LOWER = {name.lower(): fields for name, fields in KNOWN_CONFIGS.items()}
