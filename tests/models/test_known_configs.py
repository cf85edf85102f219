"""The table of well-known hub configs: every entry builds offline, and sizes match the published parameter counts."""

import pytest

from chunkwise.models.known import KNOWN_CONFIGS, known_config
from chunkwise.models.loading import load_model_config


def test_every_entry_builds_a_config_without_a_request(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("tried the network"))
    for name, fields in KNOWN_CONFIGS.items():
        config = load_model_config(name)
        assert config.model_type == fields["model_type"] and config.num_hidden_layers == fields["num_hidden_layers"], name
        assert config.vocab_size == fields["vocab_size"] and config.max_position_embeddings == fields["max_position_embeddings"]
    assert known_config("META-LLAMA/llama-3.1-8b").hidden_size == 4096  # hub ids ignore case
    assert known_config("someone/unknown") is None


@pytest.mark.parametrize("name, published", [
    ("meta-llama/Llama-3.2-1B", 1.24e9), ("meta-llama/Llama-3.2-3B", 3.21e9), ("Qwen/Qwen2.5-0.5B", 0.494e9),
    ("Qwen/Qwen3-4B", 4.02e9), ("google/gemma-3-4b-it", 3.88e9),  # Gemma 3 4B: 4.3B with its 0.4B vision tower
])
def test_parameter_counts_are_the_published_ones(name, published):
    from chunkwise.plan import ModelShape

    assert ModelShape.from_name(name).parameters == pytest.approx(published, rel=0.01)


def test_bench_names_are_presets_for_loading_and_planning(monkeypatch):
    import socket

    from chunkwise.models.loading import load_causal_lm, load_tokenizer

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("tried the network"))
    model = load_causal_lm("quick", seed=1)  # random weights from the bench config, as `chunkwise bench` builds it
    assert model.config.hidden_size == 128 and model.config.vocab_size == 2048
    assert load_model_config("llama-8b").num_hidden_layers == 32
    assert load_tokenizer("quick")("ab")["input_ids"] == [257, 97, 98]  # the byte tokenizer: its ids fit any bench vocabulary
