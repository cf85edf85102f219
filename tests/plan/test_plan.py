"""`chunkwise plan` and `--chunk-size auto`: the derivation, the documented breakdowns, the refusals.

The layer trace (`chunkwise.layer_trace`) is checked against what autograd really saves for
backward (`saved_tensors_hooks`) on tiny models, per layer and per token, in the regimes that differ:
float32 and bfloat16 autocast, full and LoRA, each attention code path. The peaks themselves are
validated against `chunkwise bench` in docs/plan.md (a measurement, not a unit test).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config, T5Config

import chunkwise.attention.chunk as attention_module
from chunkwise.attention.chunk import chunk_attention
from chunkwise.cli.main import main
from chunkwise.core.batch import chunk_batch
from chunkwise.core.cache import ChunkCache
from chunkwise.core.engine import _chunk_inputs, forward_checkpoints
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.integrations.trainer import ChunkwiseConfig, plan_for_model
from chunkwise.models.presets import build_tiny_model
from chunkwise.plan import (
    MIN_AUTO_CHUNK,
    Budget,
    ModelShape,
    PlanError,
    Training,
    build_report,
    fit_chunk_size,
    method_plan,
    plan_training_step,
)
from chunkwise.plan.layers import LayerCost
from chunkwise.recipes.train import TrainConfig, train
from chunkwise.utils.memory import parse_bytes

MiB = 1 << 20
VOCAB = 1000
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----- the layer trace equals what autograd saves ------------------------------------------------------


def _config(arch: str, layers: int):
    # head_dim x heads (320) != hidden (128) and kv (80) != either: a mix-up of the three shows.
    fields = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=40, max_position_embeddings=4096)
    return (Qwen3Config if arch == "qwen3" else LlamaConfig)(**fields)


def _saved_bytes(arch: str, kind: str, layers: int, tokens: int, lora: bool, autocast: bool) -> tuple[int, tuple, tuple]:
    """Bytes autograd saves in one forward (stage 2's second chunk, after `tokens` of past; the first one, without
    a past, for "cached"), parameters and the cache's buffers excluded, plus the fresh keys/values the cache
    holds for the relay (each storage once); and the element sizes of the keys/values the cache stores and
    the layers make."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, layers)).to(torch.bfloat16 if lora and autocast else torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, VOCAB, (1, 2 * tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kind == "sdpa":
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=ids[:, :tokens], use_cache=False)
            return sum(storages.values()), (), ()
        handle = inspect_causal_lm(model)
        batch = chunk_batch(ids, labels=None, attention_mask=None, inputs_embeds=None, num_items=None, chunk_size=tokens,
                            vocab_size=VOCAB, hidden_size=128, device=torch.device("cpu"))
        cache = ChunkCache(2 * tokens, offload=kind == "offloaded")
        select_kernel = attention_module.select_kernel
        if kind == "blocked":  # the path taken where no fused kernel passes its check, run on the CPU
            attention_module.select_kernel = lambda *args, **kwargs: None
        chunk = 0 if kind == "cached" else 1
        try:
            with chunk_attention(handle.decoder.config, enabled=kind not in ("masked", "cached")):
                forward_checkpoints(handle, batch, cache, report_only=set(), devices=[])
                cache.prepare(num_past=chunk, record=False)
                inputs = _chunk_inputs(batch, chunk, handle, cache)
                exclude.update(b.untyped_storage().data_ptr() for layer in cache.layers for b in layer.stored)
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    handle.decoder(**inputs)
        finally:
            attention_module.select_kernel = select_kernel
        for fresh in (t for layer in cache.layers for t in layer.fresh):
            storages[fresh.untyped_storage().data_ptr()] = fresh.untyped_storage().nbytes()
        layer = cache.layers[-1]
        return sum(storages.values()), tuple(t.element_size() for t in layer.stored), tuple(t.element_size() for t in layer.fresh)


@pytest.mark.parametrize(
    "arch, kind, lora, autocast",
    [
        ("llama", "sdpa", False, False),
        ("llama", "split", False, False),  # o_proj saves its own [B, c, H, D] copy of the attention output
        ("llama", "split", True, False),
        ("qwen3", "split", False, True),  # autocast: float32 keys stored in bfloat16, the past read in place
        ("llama", "blocked", True, True),
        ("qwen3", "blocked", False, True),
        ("qwen3", "masked", False, False),
        ("llama", "masked", False, True),  # SDPA reads the bfloat16 cache: repeat_kv copies in bfloat16
        ("llama", "offloaded", False, True),  # the chunk's own float32 keys rounded to the cache's bfloat16: saved
        ("qwen3", "offloaded", True, True),
        ("qwen3", "cached", False, True),  # attention="model" without a past: SDPA reads the cache's bfloat16 views
    ],
)
def test_layer_trace_matches_what_autograd_saves(arch, kind, lora, autocast):
    tokens = 16
    # Differences cancel everything that is not per layer and per token (embeddings, autocast's weight copies).
    runs = {(layers, size): _saved_bytes(arch, kind, layers, size, lora, autocast) for layers in (1, 2) for size in (tokens, 2 * tokens)}
    measured = {layers: runs[layers, 2 * tokens][0] - runs[layers, tokens][0] for layers in (1, 2)}
    per_layer = measured[2] - measured[1]
    shape = ModelShape.from_config(_config(arch, 2), name=arch)
    training = Training.from_precision("bfloat16" if autocast else "float32", device_type="cpu", lora_r=8 if lora else 0)
    cost = LayerCost.trace(shape, training, kind)
    # From `tokens` to `2 tokens` chunk tokens, the keys go from 2 tokens to 4 tokens (past + chunk); sdpa and cached
    # have no per-key terms.
    keys = 0 if kind == "sdpa" else 2 * tokens
    predicted = cost.per_token * tokens + cost.per_key * keys + cost.per_token_key * (2 * tokens * 4 * tokens - tokens * 2 * tokens)
    assert predicted == per_layer
    if kind != "sdpa":  # the cache's element sizes (KV cache and its gradient), and the relay's
        _, stored, made = runs[2, tokens]
        assert (cost.kv_sizes, cost.state_sizes) == (stored, made)


# ----- documented breakdowns (docs/plan.md) --------------------------------------------------------------


def test_tiny_llama_breakdown_is_the_documented_one():
    shape = ModelShape.from_name("tiny-llama")
    assert (shape.parameters, shape.layers, shape.kv_heads, shape.head_dim) == (90432, 2, 2, 16)
    training = Training.from_precision("float32", device_type="cpu")
    plan = method_plan(shape, training, "seco", seq_len=1024, chunk_size=128)
    # docs/plan.md, "What is counted": per layer 6h + 3Hd + 2H_kv d + 4i floats + 2 rsqrt + 4 lse = 4632 B/token.
    layer, head_input, loss = 4632, 900, 3 * 4 * 128
    assert plan.parts == {
        "weights": 90432 * 4, "gradients": 90432 * 4, "optimizer": 2 * 90432 * 4,
        "kv_cache": 2 * 2 * 16 * 8 * 1024, "kv_gradient": 2 * 2 * 16 * 8 * 1024,
        "activations": (2 * layer + head_input) * 128, "logits_loss": loss * 128,
    }
    full = method_plan(shape, training, "full", seq_len=1024)
    assert full.phase == "loss backward" and "gradients" not in full.parts  # the peak comes before backward allocates them


def test_llama_8b_lora_breakdown_is_the_documented_one():
    from chunkwise.models.presets import BENCH_MODELS

    shape = ModelShape.from_config(LlamaConfig(**BENCH_MODELS["llama-8b"]), name="llama-8b")
    training = Training.from_precision("bfloat16", device_type="cuda", lora_r=8)
    plan = method_plan(shape, training, "seco", seq_len=32768, chunk_size=1024)
    adapters = 32 * 8 * ((4096 + 4096) + (4096 + 1024))  # q_proj and v_proj in 32 layers
    assert plan.parts["weights"] == 8_030_261_248 * 2 + adapters * 4
    assert plan.parts["kv_cache"] == 32 * 8 * 128 * (2 + 2) * 32768  # 4 GiB: bfloat16 keys and values
    # the first layer's keys depend on frozen weights only: no gradient buffer for them
    assert plan.parts["kv_gradient"] == plan.parts["kv_cache"] - 8 * 128 * 2 * 32768
    assert plan.parts["logits_loss"] == 3 * 4 * 128256 * 1024
    assert round(plan.peak / (1 << 30), 2) == 29.18  # the table in docs/plan.md


# ----- errors --------------------------------------------------------------------------------------------


def test_bad_configs_get_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100).save_pretrained(tmp_path / "t5")
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path / "empty"), "has no config.json"),
        (str(tmp_path / "t5"), "encoder-decoder"),
    ]
    for model, message in cases:
        assert main(["plan", "--model", model, "--seq-len", "1024", "--memory", "1GiB"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(PlanError, match="give --seq-len"):  # and no device here to take the budget from
        build_report(ModelShape.from_name("tiny-llama"), Training(), seq_len=None, chunk_size=None, budget=None)
    assert main(["plan", "--model", "tiny-llama", "--seq-len", "64", "--memory", "1GiB", "--lora-targets", "nope"]) == 2
    assert "match no module" in capsys.readouterr().err


def test_impossible_length_is_refused_with_the_planners_numbers(capsys):
    assert main(["plan", "--model", "tiny-llama", "--device", "cpu", "--seq-len", "100000", "--memory", "16MiB", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["recommended"] is None and not any(m["fits"] for m in report["methods"])
    assert report["longest"]["seco"]["seq_len"] < 100000 < report["seq_len"] + 1
    shape, training = ModelShape.from_name("tiny-llama"), Training.from_precision("float32", device_type="cpu")
    with pytest.raises(PlanError) as error:
        fit_chunk_size(shape, training, seq_len=100000, budget=Budget(16 * MiB, "given by --memory"))
    message = str(error.value)
    assert f"{MIN_AUTO_CHUNK}-token chunks needs" in message and "KV cache" in message and "14.4 MiB usable" in message
    assert "The longest sequence that fits is" in message


# ----- --chunk-size auto ---------------------------------------------------------------------------------


def test_auto_picks_the_largest_chunk_that_fits_and_a_smaller_one_when_the_budget_shrinks():
    shape, training = ModelShape.from_name("tiny-llama"), Training.from_precision("float32", device_type="cpu")
    chosen = []
    for budget_mib in (64, 32, 16, 12, 10):
        budget = Budget(budget_mib * MiB, "given by --memory")
        plan = fit_chunk_size(shape, training, seq_len=4096, budget=budget)
        assert plan.total("cpu") <= budget.usable
        if plan.chunk_size < 4096:  # the next larger candidate does not fit
            bigger = method_plan(shape, training, "seco", seq_len=4096, chunk_size=2 * plan.chunk_size)
            assert bigger.total("cpu") > budget.usable
        chosen.append(plan.chunk_size)
    assert chosen == sorted(chosen, reverse=True) and chosen[0] == 4096 and chosen[-1] < 512, chosen


def test_train_auto_chunk_size_is_decided_before_loading(tmp_path, monkeypatch, capsys):
    config = dict(model="tiny-llama", data="synthetic", seq_len=512, batch_size=1, steps=1, progress=False,
                  checkpoint_every=0, eval_every=0, lora_r=0, chunk_size="auto")
    expected = fit_chunk_size(ModelShape.from_name("tiny-llama"), Training.from_precision("float32", device_type="cpu"),
                              seq_len=512, budget=Budget(5 * MiB, "given by --memory")).chunk_size
    assert expected < 512
    result = train(TrainConfig(output=str(tmp_path / "run"), memory="5MiB", **config), log=lambda line: None)
    assert json.loads((result.output / "chunkwise_run.json").read_text())["config"]["chunk_size"] == expected

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("chunkwise.recipes.train.setup.load_causal_lm", no_weights)
    monkeypatch.setattr("chunkwise.recipes.train.recipe.tokenizer_for", no_weights)
    with pytest.raises(ValueError, match=r"--chunk-size auto: 512 tokens x 1 do not fit: seco with 64-token chunks needs"):
        train(TrainConfig(output=str(tmp_path / "small"), memory="1MiB", **config), log=lambda line: None)
    assert not (tmp_path / "small").exists()
    code = main(["train", "--model", "tiny-llama", "--chunk-size", "auto", "--memory", "1MiB", "--seq-len", "512",
                 "--output", str(tmp_path / "cli"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="--memory sets the budget of --chunk-size auto"):
        TrainConfig(chunk_size=64, memory="1GiB").resolved()


def test_trainer_auto_chunk_size_follows_the_budget():
    """ChunkwiseConfig(chunk_size="auto"): the planner's choice for a loaded (LoRA) model shrinks with its budget."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("tiny-llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    chunks = []
    for memory in ("64MiB", "16MiB", "8MiB"):
        config = ChunkwiseConfig(chunk_size="auto", memory=memory)
        chunks.append(plan_for_model(model, None, config, batch_size=2, seq_len=2048, autocast=False, device=torch.device("cpu")).chunk_size)
    assert chunks[0] == 2048 and chunks[0] > chunks[1] > chunks[2], chunks
    with pytest.raises(PlanError, match="do not fit"):
        plan_for_model(model, None, ChunkwiseConfig(chunk_size="auto", memory="4MiB"), batch_size=2, seq_len=2048,
                       autocast=False, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="memory is the budget of chunk_size='auto'"):
        ChunkwiseConfig(chunk_size=64, memory="1GiB")


def test_both_auto_entry_points_make_one_decision():
    """`chunkwise train --chunk-size auto` (from the config, before loading) and `ChunkwiseConfig(chunk_size="auto")`
    (from the loaded LoRA model) give the same plan, or the same refusal, for the same model, setting and budget
    (`chunkwise.plan.auto_chunk_plan`)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("tiny-llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cpu = torch.device("cpu")

    def outcome(plan) -> object:
        try:
            return plan()
        except PlanError as error:
            return str(error)

    answers = set()
    for memory in ("64MiB", "16MiB", "8MiB", "4MiB"):
        for offload in (False, True):
            loaded = outcome(lambda: plan_for_model(model, None, ChunkwiseConfig(chunk_size="auto", memory=memory, offload_kv=offload),
                                                    batch_size=2, seq_len=2048, autocast=False, device=cpu))
            before = outcome(lambda: plan_training_step(
                build_tiny_model("tiny-llama").config, name="tiny-llama", seq_len=2048, precision="float32", device=cpu, method="seco",
                offload_kv=offload, memory=parse_bytes(memory, "--memory"), lora_r=4, lora_targets=("q_proj", "v_proj"), batch_size=2))
            assert loaded == before, (memory, offload)
            answers.add(loaded if isinstance(loaded, str) else (loaded.method, loaded.chunk_size))
    assert sum(isinstance(answer, tuple) for answer in answers) > 2 and any(isinstance(answer, str) for answer in answers), answers


def test_trainer_takes_the_auto_chunk_in_its_steps(tmp_path):
    from trainer_helpers import ListDataset, training_args

    from chunkwise.integrations.trainer import ChunkwiseTrainer

    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": torch.ones(256, dtype=torch.long), "labels": ids.clone()}
            for ids in torch.randint(0, 128, (2, 256), generator=generator)]
    model = build_tiny_model("tiny-llama")
    # a budget where 128-token chunks fit and the whole 256-token sequence does not
    shape, training = ModelShape.from_name("tiny-llama"), Training(batch_size=2, device_type="cpu")
    need = {c: method_plan(shape, training, "seco", seq_len=256, chunk_size=c).total("cpu") for c in (128, 256)}
    memory = (need[128] + need[256]) // 2 / (1 - 0.1)
    trainer = ChunkwiseTrainer(model=model, args=training_args(tmp_path), train_dataset=ListDataset(rows),
                               chunkwise=ChunkwiseConfig(chunk_size="auto", memory=int(memory)))
    trainer.train()
    assert trainer.chunkwise_output.num_chunks == 2
    assert trainer.chunkwise_chunk_size(model, {"input_ids": rows[0]["input_ids"].expand(2, 256)}) == 128


# ----- rough edges of `chunkwise train` ----------------------------------------------------------------


def test_train_reports_a_missing_model_folder_before_loading_anything(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "nonexistent"), "--data", str(tmp_path / "data.txt"),
                 "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "tokenizer" not in err and err.count("\n") == 1, err


def test_train_output_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    for output in (tmp_path / "taken", tmp_path / "taken" / "run"):
        assert main(["train", "--model", "tiny-llama", "--steps", "1", "--output", str(output), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'taken'} is a file, not a directory" in err and "Errno" not in err, err


def test_train_refuses_a_length_beyond_the_positions_from_the_config_alone(tmp_path, monkeypatch):
    build_tiny_model("tiny-llama").save_pretrained(tmp_path / "model")  # max_position_embeddings 4096

    def no_weights(*args, **kwargs):
        raise AssertionError("weights or tokenizer were loaded")

    monkeypatch.setattr("chunkwise.recipes.train.setup.load_causal_lm", no_weights)
    monkeypatch.setattr("chunkwise.recipes.train.recipe.tokenizer_for", no_weights)
    with pytest.raises(ValueError, match="--seq-len 8192 is above the model's position limit max_position_embeddings=4096"):
        train(TrainConfig(model=str(tmp_path / "model"), seq_len=8192, output=str(tmp_path / "run"), progress=False))
