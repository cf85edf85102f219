"""`chunkwise train` / `chunkwise eval` end to end, on tiny models and data the tests write themselves."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multirank import assert_launch_succeeded, run_launcher, torchrun
from safetensors.torch import load_file
from tokenizer_fixtures import model_dir, random_text  # noqa: F401  (model_dir is a fixture)

from chunkwise.cli.main import main
from chunkwise.data.synthetic import RecallTask
from chunkwise.recipes.checkpoint import latest_checkpoint
from chunkwise.recipes.train import TrainConfig, TrainingError, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(random_text(random.Random(0), 600))
    return path


def quick(output: Path, **settings) -> TrainConfig:
    """Settings small enough for a step in well under a second."""
    base = dict(output=str(output), seq_len=48, chunk_size=16, batch_size=2, steps=2, progress=False, checkpoint_every=0)
    return TrainConfig(**{**base, **settings})


def train_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


# ----- the demo --------------------------------------------------------------------------------------


def test_demo_shortened_trains_saves_and_evaluates(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(["train", "--output", str(output), "--steps", "3", "--seq-len", "96", "--chunk-size", "32",
                 "--batch-size", "2", "--eval-every", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy:" in printed and "(chance 3.1%)" in printed
    records = train_records(output)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens"] == 192 and r["peak_memory_bytes"] > 0 for r in records)
    assert (output / "loss.png").stat().st_size > 1000
    # The final model is a plain transformers model folder with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    assert model.config.vocab_size == RecallTask().vocab_size and tokenizer("k1 v2")["input_ids"] == [6, 39]

    assert main(["eval", "--model", str(output), "--num-sequences", "4", "--chunk-size", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "synthetic" and report["documents"] == 4 and report["longest_document"] == 96
    assert report["targets"] == 4 and report["chance_accuracy"] == 1 / 32


# ----- LoRA, full fine-tuning, data formats --------------------------------------------------------------


def test_lora_trains_only_the_adapter(tmp_path, model_dir, text_file, capsys):
    output = tmp_path / "lora"
    result = train(quick(output, model=str(model_dir), data=str(text_file), lora_r=4, lr=1e-2))
    assert result.step == 2 and math.isfinite(result.last_loss)
    adapter = weights(output / "model")
    assert adapter and all("lora_" in name for name in adapter)
    assert json.loads((output / "model" / "adapter_config.json").read_text())["r"] == 4
    # LoRA B starts at zero; after two steps with lr 1e-2 it has moved.
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)

    # eval puts the adapter back on the base model named in the run; a whole 600-word document is scored.
    capsys.readouterr()
    assert main(["eval", "--model", str(output), "--data", str(text_file), "--chunk-size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 1 and report["longest_document"] == 602  # <bos> + 600 words + <eos>
    assert report["targets"] == 601 and math.isfinite(report["loss"])
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


def test_full_fine_tuning_changes_every_weight_and_reloads(tmp_path, model_dir, text_file):
    output = tmp_path / "full"
    train(quick(output, model=str(model_dir), data=str(text_file), lora_r=0, lr=1e-3))
    before, after = weights(model_dir), weights(output / "model")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)


def test_jsonl_text_and_instruction_data(tmp_path, model_dir):
    rng = random.Random(1)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"body": random_text(rng, 40)}) + "\n" for _ in range(6)))
    result = train(quick(tmp_path / "plain", model=str(model_dir), data=str(plain), text_field="body", lora_r=0))
    assert result.step == 2

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"q": random_text(rng, 30), "a": random_text(rng, 5)}) + "\n" for _ in range(6)))
    output = tmp_path / "instruct"
    result = train(quick(output, model=str(model_dir), data=str(pairs), prompt_field="q", response_field="a", lora_r=0))
    settings = json.loads((output / "chunkwise_run.json").read_text())["config"]
    assert settings["packing"] == "truncate"  # instruction examples are not packed by default
    # Only the response tokens and the EOS are targets: 6 per example, 2 examples per step.
    assert result.step == 2


# ----- exactness of the recipe ----------------------------------------------------------------------------


def test_gradient_accumulation_equals_the_larger_batch_and_seco_equals_full(tmp_path, model_dir, text_file):
    common = dict(model=str(model_dir), data=str(text_file), lora_r=0, dtype="float64", steps=3, lr=1e-3, seq_len=40)
    big = train(quick(tmp_path / "big", batch_size=4, grad_accum=1, **common))
    accumulated = train(quick(tmp_path / "acc", batch_size=2, grad_accum=2, **common))
    full = train(quick(tmp_path / "full", batch_size=4, grad_accum=1, method="full", **common))
    # The attention options reach the engine and change nothing but rounding.
    train(quick(tmp_path / "model-attention", batch_size=4, attention="model", **common))
    train(quick(tmp_path / "offload", batch_size=4, offload_kv=True, **common))
    reference = weights(tmp_path / "big" / "model")
    for other in ("acc", "full", "model-attention", "offload"):
        for name, tensor in weights(tmp_path / other / "model").items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-10, atol=1e-12)
    losses = [[r["loss"] for r in train_records(tmp_path / run)] for run in ("big", "acc", "full")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12) and losses[0] == pytest.approx(losses[2], rel=1e-12)
    assert big.step == accumulated.step == full.step == 3


def test_spaco_run_resumes_with_its_sampler_state(tmp_path, model_dir, text_file):
    common = dict(model=str(model_dir), data=str(text_file), lora_r=0, method="spaco", budget=1, sampling="bernoulli", steps=4)
    train(quick(tmp_path / "a", **common))
    train(quick(tmp_path / "b", checkpoint_every=2, keep_checkpoints=2, **common))
    # Resuming b from its step-2 checkpoint (made by deleting the final one) replays steps 3 and 4.
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")
    train(quick(tmp_path / "b", resume=True, checkpoint_every=2, keep_checkpoints=2, **common))
    assert [r["loss"] for r in train_records(tmp_path / "a")] == [r["loss"] for r in train_records(tmp_path / "b")]


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines() if '"train"' in line):
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def test_sigterm_saves_a_checkpoint_and_resume_gives_identical_losses(tmp_path):
    command = [sys.executable, "-m", "chunkwise.cli", "train", "--seq-len", "64", "--chunk-size", "16",
               "--batch-size", "2", "--steps", "12", "--eval-every", "0", "--checkpoint-every", "0", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--output", str(tmp_path / "straight")], check=True, capture_output=True, env=environment)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([*command, "--output", str(interrupted)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    _wait_for_step(interrupted / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in out and "--resume" in out
    checkpoint = latest_checkpoint(interrupted)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 12 and (interrupted / "loss.png").exists()

    resumed = subprocess.run([*command, "--output", str(interrupted), "--resume"], capture_output=True, text=True, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint}" in resumed.stdout
    straight = [r["loss"] for r in train_records(tmp_path / "straight")]
    assert [r["loss"] for r in train_records(interrupted)] == straight  # bit for bit, every step
    for name, tensor in weights(tmp_path / "straight" / "model").items():
        assert torch.equal(tensor, weights(interrupted / "model")[name]), name


# ----- bad input: one clear line, nothing lost -----------------------------------------------------------


def run_cli(capsys, *arguments) -> tuple[int, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--data", "missing/corpus.txt"], "does not exist"),
        (["--model", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["--seq-len", "5000"], "--seq-len 5000 is above the model's position limit max_position_embeddings=4096"),
        (["--method", "spaco"], "--method spaco needs --budget"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--method", "full", "--offload-kv"], "--offload-kv applies to --method seco or spaco"),
        (["--zero", "2", "--fsdp"], "give one"),
        (["--zero", "2", "--method", "full"], "--zero 2 trains chunk-wise"),
        (["--fsdp", "--dtype", "float16"], "--fsdp does not run with float16's loss scaler"),
        (["--zero", "3", "--dtype", "float64"], "DeepSpeed trains in float32 or bfloat16"),
        (["--fsdp"], "launch with torchrun --nproc_per_node N"),
    ],
)
def test_bad_options_get_one_line(tmp_path, capsys, model_dir, arguments, expected):
    arguments = [a.replace("MODEL", str(model_dir)) for a in arguments]
    defaults = ["--model", str(model_dir)] if "--model" not in arguments else []
    if "--seq-len" in arguments:
        defaults = ["--model", "tiny-llama"]
    code, error = run_cli(capsys, "train", "--output", str(tmp_path / "run"), *defaults, *arguments)
    assert code == 2 and error.startswith("chunkwise train: error:") and expected in error
    assert "\n" not in error


def test_data_problems_get_one_line(tmp_path, capsys, model_dir, monkeypatch):
    import chunkwise.recipes.train.setup as setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(setup, "load_causal_lm", no_model)  # data errors come first, before any weights load
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "w1 w2 w3"}\n{"text": "w1 w2\n')
    code, error = run_cli(capsys, "train", "--model", str(model_dir), "--data", str(bad_json), "--output", str(tmp_path / "a"))
    assert code == 2 and f"{bad_json}:2" in error and "JSON" in error

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, error = run_cli(capsys, "train", "--model", str(model_dir), "--data", str(empty), "--output", str(tmp_path / "b"))
    assert code == 2 and "no examples found" in error

    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "w1 w2 w3 w4"}) + "\n" + json.dumps({"text": " "}) + "\n")
    code, error = run_cli(capsys, "train", "--model", str(model_dir), "--data", str(short), "--output", str(tmp_path / "c"))
    assert code == 2 and f"{short}:2" in error


def test_extrapolation_is_allowed_with_a_warning(tmp_path, capsys):
    code = main(["train", "--model", "tiny-llama", "--lora-r", "0", "--seq-len", "4100", "--chunk-size", "2048", "--steps", "1",
                 "--batch-size", "1", "--allow-extrapolation", "--no-progress", "--output", str(tmp_path / "x"), "--eval-every", "0"])
    assert code == 0
    assert "positions past 4096 are extrapolated" in capsys.readouterr().out


def test_output_directory_guards(tmp_path, capsys):
    output = tmp_path / "run"
    small = ["--seq-len", "64", "--chunk-size", "32", "--batch-size", "1", "--steps", "1", "--eval-every", "0", "--no-progress", "--output", str(output)]
    assert main(["train", *small]) == 0
    capsys.readouterr()
    code, error = run_cli(capsys, "train", *small)
    assert code == 2 and "holds another run; pass --resume to continue it or --overwrite to replace it" in error
    assert main(["train", *small, "--overwrite"]) == 0

    other = tmp_path / "papers"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    code, error = run_cli(capsys, "train", *small[:-1], str(other), "--overwrite")
    assert code == 2 and "is not empty and is not a chunkwise run" in error
    assert (other / "thesis.tex").read_text() == "precious"

    code, error = run_cli(capsys, "train", *small[:-1], str(tmp_path / "fresh"), "--resume")
    assert code == 2 and "holds no chunkwise run to continue" in error

    code, error = run_cli(capsys, "train", *small, "--resume", "--lr", "0.5")
    assert code == 2 and "lr: 0.01 -> 0.5" in error


def test_corrupt_checkpoint_is_named_and_kept(tmp_path, capsys):
    output = tmp_path / "run"
    small = ["--seq-len", "64", "--chunk-size", "32", "--batch-size", "1", "--steps", "2", "--eval-every", "0", "--no-progress", "--output", str(output)]
    assert main(["train", *small]) == 0
    capsys.readouterr()
    checkpoint = latest_checkpoint(output)
    optimizer_state = checkpoint / "optimizer.pt"
    original = optimizer_state.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    optimizer_state.write_bytes(bytes(data))
    code, error = run_cli(capsys, "train", *small, "--resume")
    assert code == 2 and f"checkpoint {checkpoint} is corrupt: optimizer.pt does not match its SHA-256" in error
    assert optimizer_state.exists() and latest_checkpoint(output) == checkpoint

    optimizer_state.write_bytes(original)
    (checkpoint / "rng.pt").unlink()
    code, error = run_cli(capsys, "train", *small, "--resume")
    assert code == 2 and "rng.pt is missing" in error


def test_non_finite_losses_are_skipped_then_training_stops(tmp_path, monkeypatch, model_dir, text_file):
    import chunkwise.recipes.train.step as step

    real = step.step_backward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss

    monkeypatch.setattr(step, "step_backward", flaky)
    output = tmp_path / "nan"
    config = quick(output, model=str(model_dir), data=str(text_file), lora_r=0, steps=8, checkpoint_every=3, max_bad_steps=3)
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss .* stopped at step 6 without saving\. Last good checkpoint: .*step-000003"):
        train(config)
    records = train_records(output)
    assert [r["skipped"] for r in records] == [False, True, False, True, True, True]
    assert records[1]["loss"] is None and latest_checkpoint(output).name == "step-000003"
    assert not (output / "model").exists()


# ----- distributed ------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    common = ["--seq-len", "48", "--chunk-size", "16", "--steps", "2", "--dtype", "float64", "--eval-every", "0", "--no-progress", "--dist-timeout", "60"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "chunkwise.cli", "train", *common, "--batch-size", "2", "--output", str(tmp_path / "one")],
                   check=True, capture_output=True, env=environment)
    code, output = run_launcher(
        torchrun("--nproc_per_node", "2", "-m", "chunkwise.cli", "train", *common, "--batch-size", "1", "--output", str(tmp_path / "two")),
        tmp_path / "launch", env=environment,
    )
    assert_launch_succeeded(code, output)
    assert "x 2 ranks" in output
    assert output.count("at the first step") == 1  # the final summary, printed by rank 0 alone
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-12)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for name, tensor in weights(tmp_path / "one" / "model").items():
        torch.testing.assert_close(weights(tmp_path / "two" / "model")[name], tensor, rtol=1e-10, atol=1e-12)


SHARDED = {
    # option, dtype, loss tolerance, weight tolerance. DeepSpeed trains float32, so these are float32 bounds (u = 2^-24):
    # each logged loss is a float32 sum of token losses over the batch in another grouping (per rank, then reduced),
    # test_seco_exactness.F32_TOL's derivation: <= 2 (max delta_t / l_t + (n - 1)u) with the demo model's V = 77 logits
    # (`reference.float32_log_softmax_error`: ~100u over l >= ~3: 2e-6) and n <= 94 targets (5.5e-6): 1.5e-5 worst
    # case, x2: 3e-5 (was 1e-6, below it). Weights: 4 steps, each moving a weight by lr x a normalised gradient whose
    # float32 error is of that relative size, plus u |w| per step: <= 4 (lr x 1.5e-5 + u) relative to max|w| ~ 1:
    # 1e-5 covers it. Measured 5e-8 (losses) and 6e-7 (weights, relative to each tensor's largest entry) against one
    # process. A lost chunk or a wrong normalisation is off by >= 1e-1.
    "zero2": (["--zero", "2"], "float32", 3e-5, 1e-5),
    "fsdp": (["--fsdp"], "float64", 1e-12, 1e-10),
}


def sharded_command(output: Path, option: list[str], dtype: str, *extra: str) -> list[str]:
    return torchrun(
        "--nproc_per_node", "2", "-m", "chunkwise.cli", "train", "--seq-len", "48", "--chunk-size", "16", "--steps", "4",
        "--dtype", dtype, "--eval-every", "0", "--no-progress", "--dist-timeout", "60", "--batch-size", "1",
        "--checkpoint-every", "2", "--keep-checkpoints", "2", *option, "--output", str(output), *extra,
    )


def test_torchrun_zero2_checkpoints_resumes_and_equals_one_process(tmp_path, deepspeed_cpu):
    check_sharded_training(tmp_path, "zero2", deepspeed_cpu)


def test_torchrun_fsdp_checkpoints_resumes_and_equals_one_process(tmp_path):
    check_sharded_training(tmp_path, "fsdp", {})


def check_sharded_training(tmp_path: Path, kind: str, environment: dict) -> None:
    """`--zero 2` / `--fsdp`: the model of one process with the doubled batch; every rank writes its shards into
    the checkpoint; resuming from step 2 gives the uninterrupted run's losses bit for bit."""
    option, dtype, loss_tol, weight_tol = SHARDED[kind]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **environment}
    train(quick(tmp_path / "one", steps=4, dtype=dtype, eval_every=0))
    run = tmp_path / "two"
    code, output = run_launcher(sharded_command(run, option, dtype), tmp_path / "launch", env=environment)
    assert_launch_succeeded(code, output)
    assert ("x 2 ranks (DeepSpeed ZeRO-2)" if kind == "zero2" else "x 2 ranks (FSDP2)") in output
    one, two = train_records(tmp_path / "one"), train_records(run)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=loss_tol)
    reference = weights(tmp_path / "one" / "model")
    assert set(weights(run / "model")) == set(reference)
    for name, tensor in reference.items():
        error = float((weights(run / "model")[name] - tensor).abs().max() / tensor.abs().max())
        assert error < weight_tol, (name, error)

    # Each rank's shards are in the checkpoint (and in its manifest).
    manifest = json.loads((run / "checkpoints" / "step-000004" / "manifest.json").read_text())["files"]
    shards = [name for name in manifest if name.startswith("sharded/")]
    expected = ("zero_pp_rank_0", "zero_pp_rank_1") if kind == "zero2" else ("__0_0.distcp", "__1_0.distcp")
    assert all(any(part in name for name in shards) for part in expected), shards

    # Lose everything after step 2, resume: steps 3 and 4 as before, bit for bit.
    final = weights(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "model")
    code, output = run_launcher(sharded_command(run, option, dtype, "--resume"), tmp_path / "resume", env=environment)
    assert_launch_succeeded(code, output)
    assert "resumed from" in output and "step-000002" in output
    resumed = train_records(run)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in two]
    assert all(torch.equal(tensor, final[name]) for name, tensor in weights(run / "model").items())


def test_float16_loss_scaling_is_undone(tmp_path, model_dir, text_file):
    """fp16 autocast runs with a loss scaler folded into the normaliser; loss and gradient norm come out unscaled."""
    common = dict(model=str(model_dir), data=str(text_file), lora_r=0, steps=1)
    train(quick(tmp_path / "f32", dtype="float32", **common))
    train(quick(tmp_path / "f16", dtype="float16", **common))
    (f32,), (f16,) = train_records(tmp_path / "f32"), train_records(tmp_path / "f16")
    # Measured: 1.2e-6 (loss) and 7e-5 (norm) relative; a scale left in would be off by a factor of 65536.
    assert f16["loss"] == pytest.approx(f32["loss"], rel=1e-3)
    assert f16["grad_norm"] == pytest.approx(f32["grad_norm"], rel=1e-3)
    scaler_state = torch.load(latest_checkpoint(tmp_path / "f16") / "scaler.pt", weights_only=True)
    assert scaler_state["scale"] > 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed: nothing could import it")
def test_train_without_zero_never_imports_deepspeed(tmp_path):
    """DeepSpeed is optional and slow to import, and its import prints "Setting accelerator to CPU": only --zero may import it."""
    script = ("import sys; from chunkwise.cli.main import main; code = main(sys.argv[1:]); "
              "print('deepspeed imported:', 'deepspeed' in sys.modules); sys.exit(code)")
    arguments = ["train", "--steps", "1", "--seq-len", "32", "--chunk-size", "16", "--batch-size", "2", "--eval-every", "0",
                 "--no-progress", "--output", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "deepspeed imported: False" in result.stdout
    assert "DeepSpeed" not in output and "Setting accelerator" not in output
