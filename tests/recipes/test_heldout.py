"""Held-out evaluation during training: every data format, what is logged, the best step, exact resume."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizer_fixtures import model_dir, random_text  # noqa: F401  (model_dir is a fixture)

from chunkwise.cli.main import main
from chunkwise.models.presets import build_tiny_model
from chunkwise.recipes.train.heldout import best_evaluation
from chunkwise.recipes.train import TrainConfig, train

QUICK = dict(seq_len=48, chunk_size=16, batch_size=2, progress=False, checkpoint_every=0, lora_r=0)


def eval_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


def scores_only(records: list[dict]) -> list[dict]:
    """What must be identical between two runs: everything but the wall-clock cost and memory."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s", "peak_memory_bytes")} for r in records]


def write_held_out(kind: str, folder: Path) -> tuple[str, dict]:
    """Held-out data in one of the formats `--data` takes; returns (path, extra settings)."""
    rng = random.Random(1)
    texts = [random_text(rng, 60) for _ in range(3)]
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        (folder / "held.txt").write_text(texts[0])
        return str(folder / "held.txt"), {}
    if kind == "txt-folder":
        for i, text in enumerate(texts):
            (folder / f"doc{i}.txt").write_text(text)
        return str(folder), {}
    if kind == "jsonl":
        (folder / "held.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
        return str(folder / "held.jsonl"), {"text_field": "body"}
    if kind == "jsonl-instruction":
        rows = [{"q": t[:100], "a": t[100:150]} for t in texts]
        (folder / "held.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(folder / "held.jsonl"), {"prompt_field": "q", "response_field": "a"}
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": texts})
    if kind == "json":
        table.to_json(str(folder / "held.json"))
        return str(folder / "held.json"), {}
    if kind == "csv":
        table.to_csv(str(folder / "held.csv"), index=False)
        return str(folder / "held.csv"), {}
    if kind == "parquet":
        table.to_parquet(str(folder / "held.parquet"))
        return str(folder / "held.parquet"), {}
    if kind == "saved-dataset-split":
        datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(str(folder / "saved"))
        return str(folder / "saved"), {"eval_split": "validation"}
    if kind == "hub-dataset":  # a hub name goes to `datasets.load_dataset` (faked by the test: nothing is downloaded)
        return "someone/held-out", {"eval_split": "validation"}
    raise AssertionError(kind)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads under tmp_path, not in the home directory."""
    try:
        import datasets
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "corpus.txt"
    path.write_text(random_text(random.Random(0), 400))
    return path


@pytest.mark.parametrize("kind", ["txt", "txt-folder", "jsonl", "jsonl-instruction", "json", "csv", "parquet", "saved-dataset-split",
                                  "hub-dataset"])
def test_every_data_format_is_scored_chunk_by_chunk(tmp_path, model_dir, train_file, kind, monkeypatch):  # noqa: F811
    path, fields = write_held_out(kind, tmp_path / "held")
    if kind == "hub-dataset":
        import datasets

        loads = []

        def fake_hub(name, **kwargs):
            loads.append((name, kwargs))
            return datasets.Dataset.from_dict({"text": [random_text(random.Random(7), 60)]})

        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    instruction = {k: v for k, v in fields.items() if k in ("prompt_field", "response_field")}
    data = train_file
    if instruction:  # instruction fields apply to both sets, so the training data is instruction data too
        data = tmp_path / "train.jsonl"
        data.write_text("".join(json.dumps({"q": random_text(random.Random(i), 30), "a": "w1 w2 w3"}) + "\n" for i in range(4)))
    result = train(TrainConfig(model=str(model_dir), data=str(data), eval_data=path, eval_every=1, steps=1,
                               output=str(tmp_path / "run"), **QUICK, **fields))
    before, after = result.evaluations
    assert [before["step"], after["step"]] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in result.evaluations)
    assert after["tokens"] > 0 and after["seconds"] > 0 and after["targets"] > 0 and "chance" not in after
    assert scores_only(eval_records(tmp_path / "run")) == scores_only(result.evaluations)
    if kind == "hub-dataset":
        assert loads == [("someone/held-out", {"split": "validation"})]


def test_held_out_loss_is_the_chunked_score_of_the_rows(tmp_path, model_dir, train_file):  # noqa: F811
    """The logged loss is the one a full forward gives on the rows `--eval-data` is cut into (48 tokens each)."""
    held = tmp_path / "held.txt"
    held.write_text(random_text(random.Random(3), 100))  # 100 words + BOS + EOS = 102 tokens: rows of 48, 48, 6
    result = train(TrainConfig(model=str(model_dir), data=str(train_file), eval_data=str(held), eval_every=1, steps=1,
                               output=str(tmp_path / "run"), dtype="float64", **QUICK))
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(held.read_text())["input_ids"] + [2]  # the EOS data.py appends
    assert len(ids) == 102
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 48):
            row = torch.tensor([ids[start : start + 48]])
            logits = model(input_ids=row).logits[0, :-1]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, row[0, 1:], reduction="sum"))
            targets += row.shape[1] - 1
    first = result.evaluations[0]  # step 0: the untrained weights, which build_tiny_model rebuilds
    assert first["targets"] == targets == 99 and first["sequences"] == 3
    assert first["loss"] == pytest.approx(loss_sum / targets, rel=1e-9)


def test_cli_logs_progress_plot_best_step_and_cost(tmp_path, model_dir, train_file, capsys):  # noqa: F811
    held = tmp_path / "held.txt"
    held.write_text(random_text(random.Random(5), 80))
    output = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(train_file), "--eval-data", str(held), "--eval-every", "2",
                 "--steps", "5", "--seq-len", "48", "--chunk-size", "16", "--batch-size", "2", "--lora-r", "0", "--lr", "3e-3",
                 "--log-every", "1", "--output", str(output)])
    assert code == 0
    captured = capsys.readouterr()
    evaluations = eval_records(output)
    assert [r["step"] for r in evaluations] == [0, 2, 4, 5]  # the start, every 2 steps, and the end
    best = best_evaluation(evaluations)
    saved = json.loads((output / "best_eval.json").read_text())
    assert saved["step"] == best["step"] and saved["loss"] == best["loss"] and saved["chosen_by"] == "lowest held-out loss"
    assert f"best held-out loss: {best['loss']:.4f}" in captured.out and f"at step {best['step']}" in captured.out
    assert "eval @ step 2: loss" in captured.out and "held-out evaluation: 4 evaluations" in captured.out
    # The progress line carries the latest held-out loss (plain lines here: not a terminal).
    step_3 = next(line for line in captured.err.splitlines() if line.startswith("step") and "3/5" in line)
    assert step_3.endswith(f"held-out {evaluations[1]['loss']:.4f} @ 2")


def test_resume_replays_the_eval_rows_exactly(tmp_path, model_dir, train_file):  # noqa: F811
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": random_text(random.Random(i), 50)}) + "\n" for i in range(2)))
    common = dict(model=str(model_dir), data=str(train_file), eval_data=str(held), eval_every=2, steps=5, method="spaco",
                  budget=1, sampling="bernoulli", **QUICK)
    train(TrainConfig(output=str(tmp_path / "straight"), **common))
    stopped = TrainConfig(output=str(tmp_path / "resumed"), **{**common, "checkpoint_every": 2, "keep_checkpoints": 3})
    train(stopped)
    # Go back to the step-2 checkpoint: steps 3-5 and their evaluations (4, 5) are redone.
    for step in (4, 5):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step-{step:06d}")
    resumed = train(TrainConfig(**{**vars(stopped), "resume": True}))
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in resumed_rows] == [(r["kind"], r["step"]) for r in straight_rows]
    assert scores_only(eval_records(tmp_path / "resumed")) == scores_only(eval_records(tmp_path / "straight"))
    assert [r["loss"] for r in resumed_rows if r["kind"] == "train"] == [r["loss"] for r in straight_rows if r["kind"] == "train"]
    assert [r["step"] for r in resumed.evaluations] == [0, 2, 4, 5]  # the result counts the evaluations before the resume
    bests = [json.loads((tmp_path / run / "best_eval.json").read_text()) for run in ("straight", "resumed")]
    assert scores_only(bests)[0] == scores_only(bests)[1]


def test_synthetic_task_keeps_its_own_held_out_stream(tmp_path):
    result = train(TrainConfig(output=str(tmp_path / "demo"), seq_len=64, chunk_size=32, batch_size=2, steps=1, eval_every=1,
                               progress=False, checkpoint_every=0))
    assert [r["chance"] for r in result.evaluations] == [1 / 32, 1 / 32]
    assert result.evaluations[0]["sequences"] == 32 and result.evaluations[0]["targets"] == 32


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(eval_every=2), "--eval-every 2 needs held-out data for --data"),
        (dict(eval_data="held.txt", eval_every=0), "--eval-data needs --eval-every N > 0"),
        (dict(eval_data="missing/held.txt"), "data file missing/held.txt does not exist"),
    ],
)
def test_bad_held_out_settings_are_refused_before_loading(tmp_path, model_dir, train_file, settings, expected):  # noqa: F811
    with pytest.raises(ValueError, match=expected.replace("-", r"\-").replace(".", r"\.")):
        train(TrainConfig(model=str(model_dir), data=str(train_file), output=str(tmp_path / "run"), steps=1, **QUICK, **settings))
    assert not (tmp_path / "run").exists()
