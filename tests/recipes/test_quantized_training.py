"""`chunkwise train --load-in-4bit` end to end on a small saved model: it trains, held-out evaluation with
--eval-data leaves every later step as it would be without it, a resumed run is bit-identical to a straight
one, and `chunkwise eval` scores the run on the base it was trained on."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file  # noqa: E402
from tokenizer_fixtures import WORDS, word_tokenizer  # noqa: E402

from chunkwise.models.presets import build_tiny_model  # noqa: E402
from chunkwise.recipes.evaluate import EvalConfig, evaluate  # noqa: E402
from chunkwise.recipes.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A saved tiny Llama with its tokenizer, a training text and a held-out text."""
    root = tmp_path_factory.mktemp("quantized")
    build_tiny_model("tiny-llama", seed=0).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    for name in ("train.txt", "heldout.txt"):
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    return root / "model", root / "train.txt", root / "heldout.txt"


def run(output: Path, files, **settings) -> TrainConfig:
    model, data, heldout = files
    base = dict(model=str(model), data=str(data), output=str(output), load_in_4bit=True, lora_r=4, seq_len=48,
                chunk_size=16, batch_size=2, steps=4, lr=1e-2, dtype="float32", device="cpu", progress=False,
                checkpoint_every=2, keep_checkpoints=2, eval_data=str(heldout), eval_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(**{**base, **settings}))


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model" / "adapter_model.safetensors")


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_train_load_in_4bit_evaluates_resumes_bit_identically_and_eval_scores_it(tmp_path, files):
    run(tmp_path / "straight", files)
    trained = adapter(tmp_path / "straight")
    assert trained and all(torch.isfinite(t).all() for t in trained.values())
    assert all(math_ok(loss) for loss in losses(tmp_path / "straight"))

    # Held-out evaluation every step (eval mode, no grad: the 4-bit repack's trigger) changes no later step.
    run(tmp_path / "no-eval", files, eval_data=None, eval_every=0)
    assert losses(tmp_path / "no-eval") == losses(tmp_path / "straight")
    assert all(torch.equal(t, adapter(tmp_path / "no-eval")[name]) for name, t in trained.items())

    # Resumed from the step-2 checkpoint: steps 3 and 4 replayed bit for bit.
    run(tmp_path / "resumed", files)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "resumed" / "model")
    run(tmp_path / "resumed", files, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert all(torch.equal(t, adapter(tmp_path / "resumed")[name]) for name, t in trained.items())

    # chunkwise eval loads the run's base quantized as it was trained, with the adapter.
    _, _, heldout = files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(EvalConfig(model=str(tmp_path / "straight"), data=str(heldout), seq_len=48, chunk_size=16, device="cpu"),
                          log=lambda line: None)
    assert report.targets > 0 and math_ok(report.loss) and report.loss < 10


def math_ok(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def test_a_full_fine_tune_of_a_4bit_base_is_refused_before_loading(tmp_path, files):
    model, data, _ = files
    with pytest.raises(ValueError, match=r"^--load-in-4bit freezes the base in 4-bit weights.*--lora-r N"):
        TrainConfig(model=str(model), data=str(data), output=str(tmp_path), load_in_4bit=True, lora_r=0).resolved()
