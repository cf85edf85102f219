"""`chunkwise train --packing`: documents kept apart by default (positions restart, per-document attention),
the old concatenation only as `concat`, `pack` its deprecated name, bad values refused in one line."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizer_fixtures import model_dir, random_text, word_tokenizer  # noqa: F401  (model_dir is a fixture)

from chunkwise.cli.main import main
from chunkwise.core.engine import SeCO
from chunkwise.recipes.train import TrainConfig, train
from chunkwise.recipes.train.heldout import file_held_out
from chunkwise.recipes.train.setup import training_sequences

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory) -> Path:
    """Twelve documents of 6 to 30 words: several fit in a 48-token row, none fills one."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("data") / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": random_text(rng, rng.randint(6, 30))}) + "\n" for _ in range(12)))
    return path


def settings(output: Path, model: Path, data: Path, **overrides) -> TrainConfig:
    base = dict(output=str(output), model=str(model), data=str(data), seq_len=48, chunk_size=16, batch_size=2, steps=2,
                lora_r=0, progress=False, checkpoint_every=0)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def engine_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every `SeCO.backward` call of the test."""
    calls, backward = [], SeCO.backward

    def spy(self, input_ids, **kwargs):
        calls.append(kwargs)
        return backward(self, input_ids, **kwargs)

    monkeypatch.setattr(SeCO, "backward", spy)
    return calls


def run_settings(output: Path) -> dict:
    return json.loads((output / "chunkwise_run.json").read_text())["config"]


def test_default_packing_keeps_documents_apart_and_seco_equals_full_backprop(tmp_path, model_dir, documents_file, engine_calls):
    config = settings(tmp_path / "seco", model_dir, documents_file, dtype="float64", lr=1e-3).resolved()
    assert config.packing == "documents"
    rows = training_sequences(config, word_tokenizer())
    assert any(row.position_ids.count(0) > 1 for row in rows), "several documents share a row"
    train(config)
    assert run_settings(tmp_path / "seco")["packing"] == "documents"
    # Every micro-batch reached the engine with its positions, restarting where a document starts.
    assert len(engine_calls) == 2
    positions = [call["position_ids"] for call in engine_calls]
    assert all(p is not None and p.dtype == torch.long for p in positions)
    assert any(int((row[1:] == 0).sum()) > 0 for p in positions for row in p)
    # Ordinary backprop reads the same positions (transformers' per-document mask): the same weights.
    train(settings(tmp_path / "full", model_dir, documents_file, dtype="float64", lr=1e-3, method="full"))
    seco, full = load_file(tmp_path / "seco" / "model" / "model.safetensors"), load_file(tmp_path / "full" / "model" / "model.safetensors")
    for name, tensor in seco.items():
        torch.testing.assert_close(tensor, full[name], rtol=1e-10, atol=1e-12)


def test_concat_is_the_old_concatenation_and_passes_no_positions(tmp_path, model_dir, documents_file, engine_calls):
    config = settings(tmp_path / "concat", model_dir, documents_file, packing="concat")
    rows = training_sequences(config.resolved(), word_tokenizer())
    assert all(row.position_ids is None and len(row.input_ids) == 48 for row in rows[:-1])
    train(config)
    assert run_settings(tmp_path / "concat")["packing"] == "concat"
    assert engine_calls and all("position_ids" not in call for call in engine_calls)


def test_pack_runs_as_concat_with_a_one_line_warning_and_old_runs_resume(tmp_path, model_dir, documents_file):
    output = tmp_path / "old"
    with pytest.warns(FutureWarning) as caught:
        train(settings(output, model_dir, documents_file, packing="pack"))
    message = str(caught[0].message)
    assert message.startswith("--packing pack is the old name of --packing concat") and "\n" not in message
    assert run_settings(output)["packing"] == "concat"
    # A run started before the rename says "pack" in its run.json: it resumes, as concat.
    record = json.loads((output / "chunkwise_run.json").read_text())
    record["config"]["packing"] = "pack"
    (output / "chunkwise_run.json").write_text(json.dumps(record))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert main(["train", "--output", str(output), "--resume", "--steps", "3"]) == 0
    assert sum('"train"' in line for line in (output / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_packing_is_refused_in_one_line(tmp_path, model_dir, documents_file, capsys):
    code = main(["train", "--model", str(model_dir), "--data", str(documents_file), "--packing", "pad", "--output", str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error == "chunkwise train: error: --packing must be one of documents, concat, truncate, got 'pad'"


def test_held_out_documents_are_scored_one_piece_per_row(tmp_path, model_dir, documents_file):
    """The chunked scorer reads a row as one stream, so held-out pieces get a row each: the targets of the packed rows."""
    config = settings(tmp_path / "x", model_dir, documents_file).resolved()
    held_out = file_held_out(str(documents_file), word_tokenizer(), batch_size=2, seq_len=48, packing="documents", pad_token_id=0)
    assert all("position_ids" not in batch for batch in held_out.batches)
    assert held_out.num_sequences == 12  # every document fits a row: one row each
    packed_targets = sum(sum(label != -100 for label in row.labels[1:]) for row in training_sequences(config, word_tokenizer()))
    held_out_targets = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in held_out.batches)
    assert held_out_targets == packed_targets


def test_lockstep_padding_continues_the_positions():
    """ZeRO-3 pads every micro-batch to --seq-len (`_pad_to`): packed positions go on counting, as `collate` pads them."""
    from chunkwise.recipes.train.step import _pad_to

    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, -100]]), "position_ids": torch.tensor([[0, 1, 0]])}
    padded = _pad_to(batch, 6, pad=0)
    assert torch.equal(padded["position_ids"], torch.tensor([[0, 1, 0, 1, 2, 3]]))
    assert torch.equal(padded["attention_mask"], torch.tensor([[1, 1, 1, 0, 0, 0]]))
    assert torch.equal(padded["labels"], torch.tensor([[-100, 6, -100, -100, -100, -100]]))
