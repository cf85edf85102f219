"""What works with no network at all: training a tiny preset on a folder of real text (its byte tokenizer),
and `chunkwise plan` for well-known hub ids (their configs are in the package)."""

import json
import socket
import time

import pytest

from chunkwise.cli.main import main


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1, and any socket connection fails the test: nothing may even try the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub is imported

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried the network: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_a_tiny_preset_trains_offline_on_a_folder_of_real_text(tmp_path, no_network, capsys):
    from transformers import AutoTokenizer

    docs = tmp_path / "docs"
    (docs / "more").mkdir(parents=True)
    (docs / "a.txt").write_text("Chunk-wise training reads any text: naïve café, Grüße, 日本語.\n" * 8)
    (docs / "more" / "b.txt").write_text("A second document, in a subfolder.\n" * 8)
    run = tmp_path / "run"
    code = main(["train", "--model", "tiny-llama", "--data", str(docs), "--seq-len", "64", "--chunk-size", "16", "--steps", "2",
                 "--output", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "loss:" in out
    tokenizer = AutoTokenizer.from_pretrained(run / "model")  # saved with the run: eval reads the same bytes
    assert tokenizer("é")["input_ids"] == [257, 0xC3, 0xA9]
    assert main(["eval", "--model", str(run), "--data", str(docs), "--chunk-size", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 2 and report["tokens"] == sum(len(f.read_bytes()) + 2 for f in docs.rglob("*.txt"))


@pytest.mark.parametrize("model, parameters, layers", [
    ("meta-llama/Llama-3.1-8B", 8.03e9, 32), ("Qwen/Qwen2.5-7B-Instruct", 7.62e9, 28), ("mistralai/Mistral-7B-v0.1", 7.24e9, 32),
    ("google/gemma-3-1b-it", 1.0e9, 26), ("llama-1b", 1.24e9, 16),
])
def test_plan_reads_well_known_ids_and_bench_names_without_the_network(no_network, capsys, model, parameters, layers):
    started = time.perf_counter()
    code = main(["plan", "--model", model, "--seq-len", "32768", "--memory", "80GiB", "--json"])
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["layers"] == layers
    assert report["model"]["parameters"] == pytest.approx(parameters, rel=0.01)  # the published sizes
    assert report["training"]["precision"] == "bfloat16/float16 autocast"  # a GPU plan, also on a machine without one
    assert seconds < 30  # no retries: a network attempt alone took ~37 s


def test_plan_says_which_device_it_plans_for_without_a_gpu(no_network, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--model", "Qwen/Qwen3-4B", "--seq-len", "16384"]) == 0
    out, err = capsys.readouterr()
    assert "no GPU on this machine: planning for a CUDA GPU" in err and "--device cpu" in err
    assert "on cuda" in out
    assert main(["plan", "--model", "Qwen/Qwen3-4B", "--seq-len", "16384", "--device", "cpu", "--memory", "1TiB"]) == 0
    out, err = capsys.readouterr()
    assert "float32 on cpu" in out and "no GPU" not in err


def test_an_unknown_hub_id_offline_says_how_to_plan_without_the_network(no_network, capsys):
    assert main(["plan", "--model", "nobody/no-such-model", "--seq-len", "1024"]) == 2
    err = capsys.readouterr().err
    assert "pass a local folder holding its config.json" in err and "meta-llama/Llama-3.2-1B" in err and err.count("\n") == 1
