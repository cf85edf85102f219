"""ChunkwiseTrainer against plain `transformers.Trainer`: same step, same parameters afterwards.

The reference is a plain Trainer whose loss is computed in the model's dtype with chunkwise.loss
(`Float64LossTrainer`): transformers' own causal-LM loss upcasts logits to float32, which would hide float64
agreement behind float32 rounding. Its `compute_loss` follows Trainer's contract exactly (divide by
`num_items_in_batch` when Trainer gives it, else a per-batch mean that Trainer divides by the accumulation
steps), so both of Trainer's normalisation paths are compared. One comparison uses transformers' own loss,
within a tolerance derived from its float32 arithmetic (`transformers_loss_tolerances`), to pin the conventions.

A two-process DDP run (gloo, through accelerate) checks the multi-rank normalisation the same way.

Data: 24-token rows with right padding and -100 labels, chunk size 5 (ragged last chunk), so micro-batches
have different numbers of valid targets and the normalisation matters.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from multirank import run_ranks
from peft import LoraConfig, get_peft_model
from reference import U32, float32_log_softmax_error, max_relative_error
from trainer_helpers import CHUNK, SEQ_LEN, Float64LossTrainer, ListDataset, make_rows, training_args, updates
from transformers import Trainer

import chunkwise.integrations.trainer as hf
from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels
from chunkwise.integrations.trainer import ChunkwiseConfig, ChunkwiseTrainer, ChunkwiseTrainerMixin
from chunkwise.models.presets import build_tiny_model

F64_TOL = 1e-10  # measured: parameter updates agree to 2e-14..1e-13 relative (max_relative_error)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_both(tmp_path, model, rows, *, accepts_loss_kwargs=True, chunkwise_options=None, **arg_overrides):
    """One run of the plain reference and one of ChunkwiseTrainer (SeCO) from the same state and data."""
    results = {}
    for name, cls in (("plain", Float64LossTrainer), ("chunkwise", ChunkwiseTrainer)):
        m = copy.deepcopy(model)
        config = ChunkwiseConfig(chunk_size=CHUNK, **(chunkwise_options or {}))
        extra = {"chunkwise": config} if cls is ChunkwiseTrainer else {}
        trainer = cls(model=m, args=training_args(tmp_path / name, **arg_overrides), train_dataset=ListDataset(rows), **extra)
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # picks Trainer's normalisation path
        output = trainer.train()
        results[name] = (params(m), output.training_loss, trainer.state.log_history[0]["grad_norm"])
    return results


def assert_same_step(results, before, label):
    (plain, plain_loss, plain_norm), (chunk, chunk_loss, chunk_norm) = results["plain"], results["chunkwise"]
    error = max_relative_error(updates(chunk, before), updates(plain, before))
    assert error < F64_TOL, f"{label}: parameter updates differ by {error:.3g} relative"
    for name in plain:
        torch.testing.assert_close(chunk[name], plain[name], rtol=F64_TOL, atol=0)
    # Trainer sums the logged loss in a float32 tensor, so this one is float32-rounded on both sides.
    assert math.isclose(chunk_loss, plain_loss, rel_tol=F64_TOL), (chunk_loss, plain_loss)
    assert math.isclose(chunk_norm, plain_norm, rel_tol=F64_TOL), (chunk_norm, plain_norm)
    return error


# ----- (a), (b): one optimizer step equals plain Trainer's ------------------------------------------


@pytest.mark.parametrize("options", [{}, {"attention": "model"}, {"offload_kv": True}], ids=["default", "model-attention", "offload"])
def test_one_step_matches_plain_trainer(tmp_path, options):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    before = params(model)
    results = train_both(tmp_path, model, make_rows(2), chunkwise_options=options)
    assert results["plain"][2] > 0.5, "the test means to exercise gradient clipping"
    assert_same_step(results, before, "one step")


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "mean_over_accumulation"])
def test_gradient_accumulation_matches_plain_trainer(tmp_path, accepts_loss_kwargs):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    before = params(model)
    rows = make_rows(4)
    # Clipping off (max_grad_norm above the norm ~1.7): it would rescale away a wrong normaliser.
    results = train_both(
        tmp_path, model, rows, accepts_loss_kwargs=accepts_loss_kwargs, gradient_accumulation_steps=2, max_grad_norm=10.0
    )
    assert_same_step(results, before, f"accumulation, accepts_loss_kwargs={accepts_loss_kwargs}")


def test_accumulation_paths_differ(tmp_path):
    """Sanity: the two normalisations give different steps on this data, so the tests above can tell them apart."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    runs = []
    for flag in (True, False):
        m = copy.deepcopy(model)
        trainer = ChunkwiseTrainer(
            model=m,
            args=training_args(tmp_path / str(flag), gradient_accumulation_steps=2, max_grad_norm=0.0),
            train_dataset=ListDataset(make_rows(4)),
            chunkwise=ChunkwiseConfig(chunk_size=CHUNK),
        )
        trainer.model_accepts_loss_kwargs = flag
        trainer.train()
        runs.append(params(m))
    before = params(model)
    assert max_relative_error(updates(runs[0], before), updates(runs[1], before)) > 1e-3


# ----- DDP: two CPU processes (gloo) through accelerate -------------------------------------------------


def ddp_worker(rank: int, out_dir: str) -> dict:
    # The harness has joined the gloo process group; these variables make accelerate see a 2-process CPU run.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    results = {}
    for name, cls in (("plain", Float64LossTrainer), ("chunkwise", ChunkwiseTrainer)):
        m = copy.deepcopy(model)
        extra = {"chunkwise": ChunkwiseConfig(chunk_size=CHUNK)} if cls is ChunkwiseTrainer else {}
        args = training_args(Path(out_dir) / name, gradient_accumulation_steps=2, max_grad_norm=10.0, ddp_backend="gloo")
        trainer = cls(model=m, args=args, train_dataset=ListDataset(make_rows(8)), **extra)
        output = trainer.train()
        results[name] = (params(m), output.training_loss, type(trainer.model_wrapped).__name__)
    return results


def test_ddp_step_matches_plain_trainer(tmp_path):
    """Under DDP Trainer counts the targets of all ranks and scales the loss by the number of processes."""
    ranks = run_ranks(ddp_worker, 2, tmp_path / "ranks", args=(str(tmp_path),))
    before = params(build_tiny_model("tiny-llama", dtype=torch.float64))
    for rank in ranks:
        (plain, plain_loss, wrapper), (chunk, chunk_loss, _) = rank["plain"], rank["chunkwise"]
        assert wrapper == "DistributedDataParallel"
        error = max_relative_error(updates(chunk, before), updates(plain, before))
        assert error < F64_TOL, f"DDP: parameter updates differ by {error:.3g} relative"
        assert math.isclose(chunk_loss, plain_loss, rel_tol=F64_TOL), (chunk_loss, plain_loss)


def transformers_loss_tolerances(model, rows: list[dict], batch_size: int = 2) -> tuple[float, float]:
    """(loss, parameter update) relative tolerances for comparing with transformers' causal-LM loss on `rows`, which
    rounds the float64 logits to float32 and computes cross-entropy, its sum and its backward in float32.

    Derived at the model's current parameters (the comparisons below run one step, whose losses are all taken there):
    * loss: per token, |delta l_t| <= delta_t (`reference.float32_log_softmax_error`); the float32 sum over the n
      targets of a batch adds (n - 1)u sum_t l_t, the division by the count and Trainer's float32 accumulation over
      micro-batches 2u. Relative to the loss (every l_t > 0, no cancellation): max_t delta_t / l_t + (n + 1)u, x2 for
      second-order terms. Here ~6e-6 (the worst-case float32 sum over V = 128 logits and over 46 targets dominates).
    * update (one SGD step: the update is -lr x the gradient, float64 on both sides): float64 backprop of the seeds
      dL/dz_tv = (p_v - 1[v = y]) / n, which transformers computes in float32. Each seed is off by at most
      eps = max_t delta_t (the error of log p_v, so relative of p_v) + 4u (exp, the subtraction, the division, the
      cast), x2; a gradient entry by at most eps times sum |seed| |dz/dtheta|, which is the entry's size when the
      terms do not cancel: 10 eps allows a cancellation factor of 10. Here ~2e-4.
    Both stay below 1e-3, so a wrong normalisation, a lost chunk or a missing factor (>= 1e-1) still fails.
    """
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = shift_labels(batch["labels"])
    valid = targets != IGNORE_INDEX
    delta = float32_log_softmax_error(logits[valid], targets[valid])
    token_loss = -torch.log_softmax(logits[valid], -1).gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1)
    n = batch_size * (targets.shape[1])
    loss_tol = 2 * ((delta / token_loss).max().item() + (n + 1) * U32)
    update_tol = 10 * 2 * (delta.max().item() + 4 * U32)
    assert max(loss_tol, update_tol) < 1e-3
    return loss_tol, update_tol


def test_loss_conventions_match_transformers_loss(tmp_path):
    """Against Trainer with transformers' own loss (float32 logits inside): equal within what float32 allows
    (`transformers_loss_tolerances`)."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    before = params(model)
    runs = {}
    for name, cls, extra in (("hf", Trainer, {}), ("chunkwise", ChunkwiseTrainer, {"chunkwise": ChunkwiseConfig(chunk_size=CHUNK)})):
        m = copy.deepcopy(model)
        trainer = cls(model=m, args=training_args(tmp_path / name, gradient_accumulation_steps=2), train_dataset=ListDataset(make_rows(4)), **extra)
        runs[name] = (params(m), trainer.train().training_loss)
    loss_tol, update_tol = transformers_loss_tolerances(model, make_rows(4))
    assert max_relative_error(updates(runs["chunkwise"][0], before), updates(runs["hf"][0], before)) < update_tol
    assert math.isclose(runs["chunkwise"][1], runs["hf"][1], rel_tol=loss_tol)


# ----- (c) LoRA -----------------------------------------------------------------------------------------


def test_lora_step_matches_plain_trainer(tmp_path):
    base = build_tiny_model("tiny-llama", dtype=torch.float64)
    # init_lora_weights=False: B is random too, so every LoRA matrix gets a gradient on the first step.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    before = params(model)
    assert all("lora_" in name for name in before)
    results = train_both(tmp_path, model, make_rows(4), gradient_accumulation_steps=2, max_grad_norm=10.0)
    assert_same_step(results, before, "LoRA")


# ----- (d) SpaCO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "bernoulli"])
def test_spaco_trains_with_finite_loss(tmp_path, sampling):
    model = build_tiny_model("tiny-llama", dtype=torch.float32)
    before = params(model)
    trainer = ChunkwiseTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, optim="adamw_torch", learning_rate=1e-3),
        train_dataset=ListDataset(make_rows(4)),
        chunkwise=ChunkwiseConfig(method="spaco", chunk_size=CHUNK, budget=2, sampling=sampling, max_compensation=2.0),
    )
    output = trainer.train()
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    out = trainer.chunkwise_output
    assert out.num_chunks == 5 and out.compensation == 2.0
    assert any(not torch.equal(p, before[n]) for n, p in params(model).items())


# ----- (e) evaluation -------------------------------------------------------------------------------------


def unchunked_eval_loss(model, rows, batch_size) -> float:
    """Trainer's eval_loss by hand: each batch's mean token loss, weighted by its number of rows."""
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = shift_labels(batch["labels"])
            loss = chunk_loss_sum(logits, targets) / (targets != IGNORE_INDEX).sum()
            losses += [loss.item()] * len(batch["input_ids"])
    return sum(losses) / len(losses)


def test_evaluate_matches_unchunked_loss(tmp_path):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    rows = make_rows(4, seed=1)
    trainer = ChunkwiseTrainer(model=model, args=training_args(tmp_path), eval_dataset=ListDataset(rows), chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
    chunked = trainer.evaluate()["eval_loss"]
    assert math.isclose(chunked, unchunked_eval_loss(model, rows, 2), rel_tol=F64_TOL)
    # Same number as plain Trainer's own evaluation (transformers' loss: float32 logits inside), within what float32
    # allows (`transformers_loss_tolerances`; the float32 mean of the two batches' losses adds u, inside its factor 2).
    plain = Trainer(model=model, args=training_args(tmp_path / "plain"), eval_dataset=ListDataset(rows)).evaluate()["eval_loss"]
    assert math.isclose(chunked, plain, rel_tol=transformers_loss_tolerances(model, rows)[0])


# ----- (f) checkpoint and resume ----------------------------------------------------------------------


def test_resume_from_checkpoint_replays_the_same_run(tmp_path):
    """3 steps straight == 1 step, checkpoint, resume to 3 — SpaCO's selections included."""
    config = ChunkwiseConfig(method="spaco", chunk_size=CHUNK, budget=2, sampling="uniform", seed=3)
    rows = make_rows(6)

    def run(directory, *, resume=None, save=False):
        model = build_tiny_model("tiny-llama", dtype=torch.float64)
        args = training_args(directory, max_steps=3, optim="adamw_torch", learning_rate=1e-2,
                             save_strategy="steps" if save else "no", save_steps=1)
        trainer = ChunkwiseTrainer(model=model, args=args, train_dataset=ListDataset(rows), chunkwise=config)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, params(model)

    straight, straight_params = run(tmp_path / "straight")
    saved, _ = run(tmp_path / "saved", save=True)
    checkpoint = tmp_path / "saved" / "checkpoint-1"
    assert (checkpoint / hf.SAMPLER_STATE_NAME).is_file()
    resumed, resumed_params = run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == 3
    assert torch.equal(resumed.chunkwise_sampler.generator.get_state(), straight.chunkwise_sampler.generator.get_state())
    for name in straight_params:
        torch.testing.assert_close(resumed_params[name], straight_params[name], rtol=F64_TOL, atol=0)


# ----- mixed precision, label names -------------------------------------------------------------------


def test_bf16_runs_both_stages_under_autocast(tmp_path):
    model = build_tiny_model("tiny-llama", dtype=torch.float32)
    seen = []
    model.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    trainer = ChunkwiseTrainer(model=model, args=training_args(tmp_path, bf16=True), train_dataset=ListDataset(make_rows(2)), chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
    output = trainer.train()
    # Stage 1 calls the decoder body for chunks 0..3, stage 2 (through the LM) for all 5.
    assert len(seen) == 9 and all(dtype == torch.bfloat16 for dtype in seen), seen
    assert math.isfinite(output.training_loss)


def test_custom_label_name(tmp_path):
    rows = make_rows(2)
    renamed = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "target": r["labels"]} for r in rows]
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    runs = []
    for data, names in ((rows, None), (renamed, ["target"])):
        m = copy.deepcopy(model)
        trainer = ChunkwiseTrainer(model=m, args=training_args(tmp_path, label_names=names), train_dataset=ListDataset(data), chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
        trainer.train()
        runs.append(params(m))
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=F64_TOL, atol=0)


# ----- (g) refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fp16=True), "fp16=True"),
        (dict(gradient_checkpointing=True), "gradient_checkpointing=True"),
        (dict(activation_checkpointing=True), "drops the KV cache"),
        (dict(torch_compile=True), "torch_compile=True"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor=0.1"),
        (dict(optim="lomo"), "optim=lomo"),
        (dict(fsdp=True, fsdp_config={"version": 1}), "fsdp with FSDP1"),
        (dict(label_names=["a", "b"]), "exactly one name"),
    ],
)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_refused_training_arguments(tmp_path, overrides, message):
    args = training_args(tmp_path, **overrides)
    with pytest.raises(ValueError, match="ChunkwiseTrainer cannot use") as error:
        ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=args, chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "installed, stage, message",
    [(False, 3, "pip install 'chunkwise[deepspeed]'"), (True, 0, "without ZeRO (zero_optimization.stage 0)")],
)
def test_refused_deepspeed(tmp_path, monkeypatch, installed, stage, message):
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(ds, "is_deepspeed_available", lambda: installed)
    args = training_args(tmp_path)
    # TrainingArguments itself needs deepspeed installed to take a config: set it afterwards.
    args.deepspeed = {"zero_optimization": {"stage": stage}}
    with pytest.raises(ValueError, match="ChunkwiseTrainer cannot use") as error:
        ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=args)
    assert message in str(error.value)


def test_refused_data_parallel_and_parallelism(tmp_path):
    import types

    args = training_args(tmp_path)
    args._n_gpu = 2  # as on a machine with two GPUs and no launcher
    with pytest.raises(ValueError, match="DataParallel"):
        ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=args)
    args = training_args(tmp_path)
    args.parallelism_config = types.SimpleNamespace(tp_size=1, cp_size=2, sp_size=1, dp_shard_size=1)
    with pytest.raises(ValueError, match="cp_size"):
        ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=args)


def test_refused_model_with_checkpointing_on(tmp_path):
    model = build_tiny_model("tiny-llama")
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        ChunkwiseTrainer(model=model, args=training_args(tmp_path))


def test_refused_compute_loss_func(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=training_args(tmp_path), compute_loss_func=lambda *a, **k: 0)


def test_refused_unknown_batch_key(tmp_path):
    # (Issue 20: packed batches' position_ids are taken now, see test_packed_trainers; other keys are still refused.)
    rows = [dict(r, token_type_ids=torch.zeros(SEQ_LEN, dtype=torch.long)) for r in make_rows(2)]
    args = training_args(tmp_path, remove_unused_columns=False)  # else Trainer drops what the model does not take
    trainer = ChunkwiseTrainer(model=build_tiny_model("tiny-llama"), args=args, train_dataset=ListDataset(rows), chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
    with pytest.raises(ValueError, match=r"\['token_type_ids'\]"):
        trainer.train()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(method="sgd"), "method must be one of"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(method="spaco"), "needs budget"),
        (dict(method="spaco", budget=0), "budget must be a positive integer"),
        (dict(method="spaco", budget=2, max_compensation=0.5), "max_compensation must be a number >= 1"),
        (dict(budget=2), "only applies to method='spaco'"),
        (dict(sampling="random"), "sampling must be one of"),
        (dict(attention="flash"), "attention must be one of"),
    ],
)
def test_config_checks(fields, message):
    with pytest.raises(ValueError, match=message):
        ChunkwiseConfig(**fields)


def test_mixin_composes_with_another_trainer_subclass(tmp_path):
    """The mixin in front of some other Trainer subclass (as with TRL's SFTTrainer) takes over the step."""

    class OtherTrainer(Trainer):
        def compute_loss(self, *args, **kwargs):
            raise AssertionError("chunk-wise training must not call compute_loss")

    class Combined(ChunkwiseTrainerMixin, OtherTrainer):
        pass

    trainer = Combined(model=build_tiny_model("tiny-llama"), args=training_args(tmp_path), train_dataset=ListDataset(make_rows(2)), chunkwise={"chunk_size": CHUNK})
    assert math.isfinite(trainer.train().training_loss)
