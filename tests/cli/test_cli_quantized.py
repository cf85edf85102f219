"""`chunkwise verify --load-in-4bit / --load-in-8bit`: SeCO's gradient against full backprop on a quantized base."""

from __future__ import annotations

import pytest

from chunkwise.cli.main import main

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_verify_on_a_quantized_base_passes(flag, capsys):
    code = main(["verify", "--model", "tiny-qwen2", flag, "--lora-r", "4", "--dtype", "float32", "--seq-len", "48",
                 "--chunk-size", "16", "--device", "cpu", "--tolerance", "1e-5"])
    assert code == 0, capsys.readouterr()


def test_verify_refuses_a_quantized_full_fine_tune_and_float64(capsys):
    assert main(["verify", "--model", "tiny-llama", "--load-in-4bit", "--dtype", "float32"]) == 2
    assert "--load-in-4bit freezes the base" in capsys.readouterr().err
    assert main(["verify", "--model", "tiny-llama", "--load-in-4bit", "--lora-r", "4"]) == 2  # verify's default dtype is float64
    assert "not float64" in capsys.readouterr().err
