"""`chunkwise train --packing`: documents kept apart by default (positions restart, per-document attention),
the old concatenation only as `concat`, `pack` its deprecated name, bad values refused in one line."""

from __future__ import annotations

import json
import logging
import random
import shutil
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


def test_pack_runs_as_concat_with_a_one_line_warning_and_old_runs_resume(tmp_path, model_dir, documents_file, caplog):
    output = tmp_path / "old"
    with caplog.at_level(logging.WARNING, logger="chunkwise.recipes.train.config"):
        train(settings(output, model_dir, documents_file, packing="pack", steps=3, checkpoint_every=2, keep_checkpoints=2))
    (message,) = caplog.messages
    assert message.startswith("--packing pack is the old name of --packing concat") and "\n" not in message
    assert run_settings(output)["packing"] == "concat"
    # A run started before the rename says "pack" in its run.json: cut back to its step-2 checkpoint (as an
    # interruption leaves it), it resumes, as concat, and redoes step 3.
    record = json.loads((output / "chunkwise_run.json").read_text())
    record["config"]["packing"] = "pack"
    (output / "chunkwise_run.json").write_text(json.dumps(record))
    shutil.rmtree(output / "checkpoints" / "step-000003")
    shutil.rmtree(output / "model")
    assert main(["train", "--output", str(output), "--resume"]) == 0
    assert sum('"train"' in line for line in (output / "metrics.jsonl").read_text().splitlines()) == 3
    assert (output / "model").is_dir()


def test_bad_packing_is_refused_in_one_line(tmp_path, model_dir, documents_file, capsys):
    code = main(["train", "--model", str(model_dir), "--data", str(documents_file), "--packing", "pad", "--output", str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error == "chunkwise train: error: --packing must be one of documents, concat, truncate, got 'pad'"


def test_held_out_packed_rows_score_each_document_alone(tmp_path, model_dir, documents_file):
    """Held-out rows are packed as the training rows are, and scored with their positions: the loss of each
    document alone (each piece in a row of its own), not of documents reading each other."""
    from chunkwise.core.handle import inspect_causal_lm
    from chunkwise.core.inference import score_batches
    from chunkwise.data.files import load_records
    from chunkwise.data.sequences import collate, document_pieces, tokenize_records
    from chunkwise.models.loading import load_causal_lm

    held_out = file_held_out(str(documents_file), word_tokenizer(), batch_size=2, seq_len=48, packing="documents", pad_token_id=0)
    assert all("position_ids" in batch for batch in held_out.batches) and held_out.num_sequences < 12
    pieces = document_pieces(tokenize_records(load_records(str(documents_file)), word_tokenizer()), seq_len=48)
    alone = [collate([piece], pad_token_id=0) for piece in pieces]
    handle = inspect_causal_lm(load_causal_lm(str(model_dir), dtype=torch.float64).eval())
    packed, _ = score_batches(handle, held_out.batches, chunk_size=16, device=torch.device("cpu"))
    reference, _ = score_batches(handle, alone, chunk_size=16, device=torch.device("cpu"))
    assert packed.num_targets == reference.num_targets
    assert packed.loss_sum == pytest.approx(reference.loss_sum, rel=1e-10)
    concatenated = file_held_out(str(documents_file), word_tokenizer(), batch_size=2, seq_len=48, packing="concat", pad_token_id=0)
    across, _ = score_batches(handle, concatenated.batches, chunk_size=16, device=torch.device("cpu"))
    assert across.loss != pytest.approx(packed.loss, rel=1e-6)


def test_lockstep_padding_continues_the_positions():
    """ZeRO-3 pads every micro-batch to --seq-len (`_pad_to`): packed positions go on counting, as `collate` pads them."""
    from chunkwise.recipes.train.step import _pad_to

    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, -100]]), "position_ids": torch.tensor([[0, 1, 0]])}
    padded = _pad_to(batch, 6, pad=0)
    assert torch.equal(padded["position_ids"], torch.tensor([[0, 1, 0, 1, 2, 3]]))
    assert torch.equal(padded["attention_mask"], torch.tensor([[1, 1, 1, 0, 0, 0]]))
    assert torch.equal(padded["labels"], torch.tensor([[-100, 6, -100, -100, -100, -100]]))
