"""`chunkwise verify` on what users hand it: a run directory, a folder that is no model, and, in float64, a deep
Llama-family model whose RMSNorms transformers computes in float32 inside (verify computes them in float64)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from chunkwise.cli.main import main
from chunkwise.recipes.verify import norms_in_model_dtype


def test_verify_takes_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "--steps", "1", "--seq-len", "32", "--chunk-size", "16", "--batch-size", "1",
                 "--eval-every", "0", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["verify", "--model", str(run), "--seq-len", "24", "--chunk-size", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "model.layers.*.self_attn.q_proj.weight" in out


@pytest.mark.parametrize("command", ["verify", "eval"])
def test_a_folder_without_config_json_is_named_as_such(tmp_path, capsys, command):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    assert main([command, "--model", str(tmp_path / "weights")]) == 2
    error = capsys.readouterr().err
    assert "has no config.json, so it is not a model folder" in error and "chunkwise run directory" in error
    assert "model_type" not in error and error.count("\n") == 1


def qwen_shaped(layers: int = 24):
    """Qwen2.5's shape (24 layers, grouped KV heads, q/k/v biases) at a tiny hidden size, float64."""
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.float64)


def test_float64_verify_on_a_deep_qwen_shape_with_two_threads_isolates_chunking(tmp_path, capsys):
    qwen_shaped().save_pretrained(tmp_path / "qwen")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reduction order of the full and the chunked pass differs more with threads
    try:
        code = main(["verify", "--model", str(tmp_path / "qwen"), "--seq-len", "256", "--chunk-size", "32", "--tolerance", "1e-12"])
    finally:
        torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out  # every group below 1e-12 relative
    assert "float64: 49 RMSNorm modules computed in float64 in both passes" in out  # 24 x 2 + the final norm, said so


def test_the_norms_compute_in_float64_within_and_as_transformers_wrote_them_after():
    model = qwen_shaped(layers=1)
    norm = model.model.norm
    x = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    exact = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    assert not torch.equal(norm(x), exact)  # transformers' own: rounded through float32
    torch.testing.assert_close(norm(x), exact, rtol=1e-6, atol=0)
    with norms_in_model_dtype(model) as (patched, left):
        assert (patched, left) == (3, ())
        assert torch.equal(norm(x), exact)
    assert not torch.equal(norm(x), exact)


def test_verify_checks_a_lora_runs_adapter_as_trained(tmp_path, capsys):
    run = tmp_path / "lora"
    assert main(["train", "--model", "tiny-qwen2", "--output", str(run), "--steps", "1", "--seq-len", "32", "--chunk-size", "16",
                 "--batch-size", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", "--model", str(run), "--seq-len", "24", "--chunk-size", "5"]) == 0
    out = capsys.readouterr().out
    assert "lora_A" in out and "lora_B" in out and "PASS" in out  # the adapter's weights take the gradient
    assert main(["verify", "--model", str(run), "--lora-r", "4"]) == 2
    assert "trained a LoRA adapter" in capsys.readouterr().err
