"""`chunkwise train --objective dpo|ipo|simpo`: preference data, the reference model, and the training loop.

The loop's chunk-wise DPO takes the same steps as its full-sequence DPO (`--method full`: one ordinary
forward and backward per micro-batch) in float64: the losses of every step agree to float rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from chunkwise.cli.main import main
from chunkwise.data.files import DataError
from chunkwise.data.preferences import pair_batch, read_preference_pairs
from chunkwise.recipes.train import TrainConfig, train


def write_preferences(path, count=6, filler=24):
    """Word-level examples in the demo model's vocabulary: the answer to the key stated at the start."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        words = " ".join(f"f{int(x)}" for x in torch.randint(8, (filler + 3 * i,), generator=generator))
        rows.append({"prompt": f"<bos> k{i} v{i} {words} ? k{i}", "chosen": f" v{i}", "rejected": f" v{i + 8} f1"})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def settings(tmp_path, **overrides):
    options = dict(model="demo-llama", data=str(write_preferences(tmp_path / "prefs.jsonl")), objective="dpo",
                   chunk_size=8, seq_len=64, batch_size=2, steps=4, lr=3e-2, warmup_ratio=0.0, dtype="float64",
                   lora_r=0, checkpoint_every=0, progress=False, output=str(tmp_path / "run"), overwrite=True)
    return TrainConfig(**{**options, **overrides})


def losses(result):
    records = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_chunkwise_dpo_follows_full_sequence_dpo(tmp_path):
    seco = losses(train(settings(tmp_path, output=str(tmp_path / "seco")), log=lambda _: None))
    full = losses(train(settings(tmp_path, output=str(tmp_path / "full"), method="full"), log=lambda _: None))
    assert len(seco) == len(full) == 4
    assert seco[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-12)  # the policy starts as its reference
    for a, b in zip(seco, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10, abs=1e-12)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-8, abs=1e-12)
    assert seco[-1]["rewards/margins"] > 0 and seco[-1]["loss"] < seco[0]["loss"]


def test_lora_ipo_with_the_adapter_disabled_and_the_command_line(tmp_path, capsys):
    path = write_preferences(tmp_path / "prefs.jsonl")
    code = main(["train", "--model", "demo-llama", "--data", str(path), "--objective", "ipo", "--lora-r", "4",
                 "--method", "spaco", "--budget", "3", "--sampling", "bernoulli", "--seq-len", "64", "--chunk-size", "8",
                 "--steps", "2", "--batch-size", "2", "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "objective ipo (beta 0.1, reference the base model (adapter disabled))" in out and "preference pairs" in out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(data="synthetic"), "trains on preference pairs"),
        (dict(ref_model="tiny-llama"), "vocabulary has 264 tokens"),  # issue 23: a tiny preset reading text has 264 ids
        (dict(objective="simpo", ref_model="demo-llama"), "reference-free"),
        (dict(objective="cross-entropy", beta=0.1), "apply to preference objectives"),
        (dict(response_field="chosen"), "not --response-field"),
        (dict(chunk_size="auto", memory="1GiB"), "does not plan the memory of a separate reference model"),
        (dict(eval_data="held_out.jsonl", eval_every=2), "--eval-data scores held-out cross-entropy"),
    ],
    ids=["no-data", "reference-vocabulary", "simpo-reference", "beta-without-objective", "response-field", "auto-chunk-reference",
         "eval-data"],
)
def test_bad_settings_fail_before_training(tmp_path, monkeypatch, overrides, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("chunkwise.recipes.train.setup.load_causal_lm", no_weights)  # each is refused from the configs alone
    with pytest.raises(ValueError, match=message):
        train(settings(tmp_path, **overrides), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_auto_chunk_size_plans_both_rows_of_each_pair(tmp_path):
    """LoRA DPO with 2 pairs per micro-batch is planned as 4 rows: the chunk cross-entropy gets with 4 sequences."""
    from chunkwise.recipes.train.distributed import Distributed
    from chunkwise.recipes.train.setup import check_before_loading

    def chosen(**overrides):
        config = settings(tmp_path, model="tiny-llama", lora_r=4, seq_len=512, chunk_size="auto", memory="10MiB", **overrides).resolved()
        return check_before_loading(config, tmp_path, torch.device("cpu"), Distributed(), lambda _: None).chunk_size

    pairs = chosen(batch_size=2)
    assert pairs == chosen(objective="cross-entropy", data="synthetic", batch_size=4) < chosen(objective="cross-entropy", data="synthetic", batch_size=2)


def test_preference_data_errors_name_the_line(tmp_path):
    from chunkwise.data.synthetic import DEMO_TASK

    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "k1", "chosen": "v1", "rejected": "v2"}) + "\n" + json.dumps({"prompt": "k1", "chosen": "v1"}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2 has no field 'rejected'"):
        read_preference_pairs(str(path), DEMO_TASK.tokenizer(), seq_len=16)


def test_pair_batch_refuses_unpaired_batches():
    chosen = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)}
    rejected = {key: value[:1, :3] for key, value in chosen.items()}
    with pytest.raises(ValueError, match="not paired: 2 chosen rows vs 1 rejected rows"):
        pair_batch(chosen, rejected)
    joined = pair_batch(chosen, {key: value[:, :3] for key, value in chosen.items()})
    assert joined["input_ids"].shape == (4, 5) and joined["labels"][2:, 3:].eq(-100).all() and joined["attention_mask"][2:, 3:].eq(0).all()
