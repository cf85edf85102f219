"""`chunkwise export`: a LoRA run merged into a plain transformers folder gives the adapter run's logits."""

import pytest
import torch

from chunkwise.cli.main import main


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny-llama LoRA run on real text, trained long enough (lr 1e-2) that its adapter is far from zero."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "docs").mkdir()
    (folder / "docs" / "a.txt").write_text("Merged weights must give the adapter's logits.\n" * 10)
    assert main(["train", "--model", "tiny-llama", "--data", str(folder / "docs"), "--seq-len", "64", "--chunk-size", "16",
                 "--steps", "3", "--lr", "1e-2", "--lora-r", "4", "--output", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


def test_export_merges_the_adapter_into_a_folder_plain_transformers_loads(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunkwise.recipes.run import load_trained_model

    capsys.readouterr()
    assert main(["export", "--model", str(lora_run), "--output", str(tmp_path / "merged")]) == 0
    assert "LoRA adapter merged into its base" in capsys.readouterr().out
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapter, _, _ = load_trained_model(str(lora_run))
    input_ids = torch.tensor([tokenizer("Merged weights must give the adapter's logits.")["input_ids"]])
    with torch.no_grad():
        expected = adapter.eval()(input_ids=input_ids).logits
        base = adapter.get_base_model()
        with adapter.disable_adapter():
            without = base(input_ids=input_ids).logits
        got = merged(input_ids=input_ids).logits
    assert (expected - without).abs().max() > 1e-3  # the adapter changes the logits, so the comparison means something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_never_overwrites(lora_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(lora_run), "--output", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not an empty folder" in err and err.count("\n") == 1
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
