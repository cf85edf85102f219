"""ChunkwiseTrainer with the standard QLoRA recipe: a 4-bit base through peft's `prepare_model_for_kbit_training`
(which turns gradient checkpointing on), then LoRA. The trainer switches the checkpointing off with a one-line
warning and trains the same step as plain Trainer on the same quantized model."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import prepare_model_for_kbit_training  # noqa: E402
from trainer_helpers import CHUNK, Float64LossTrainer, ListDataset, make_rows, training_args  # noqa: E402

from chunkwise import SeCO  # noqa: E402
from chunkwise.integrations.trainer import ChunkwiseConfig, ChunkwiseTrainer  # noqa: E402
from chunkwise.models.loading import add_lora, load_causal_lm  # noqa: E402
from chunkwise.models.quantize import Quantization  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
# float32 compute: chunked vs full gradients differ by float32 rounding (~1e-6 relative), and an update read back as
# (parameter after - parameter before) carries the rounding of the stored float32 parameter: 1 ulp of it each side.
RTOL = 1e-5


def kbit_prepared_lora(**prepare_options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_causal_lm("tiny-llama", quantization=Quantization(load_in_4bit=True))
    base = prepare_model_for_kbit_training(base, **prepare_options)
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    return add_lora(base, rank=4, random_b=0.1, seed=1)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_engine_alone_refuses_a_kbit_prepared_model_with_the_exact_call():
    model = kbit_prepared_lora()
    with pytest.raises(ValueError, match=r"prepare_model_for_kbit_training\(model, use_gradient_checkpointing=False\)"):
        SeCO(model, chunk_size=8).backward(torch.randint(0, 128, (1, 16)))


def test_trainer_switches_off_the_checkpointing_kbit_preparation_turned_on_and_trains_the_same_step(tmp_path, caplog):
    rows = make_rows(4)
    before = lora_params(kbit_prepared_lora())
    with caplog.at_level(logging.WARNING, logger="chunkwise.integrations.trainer"):
        model = kbit_prepared_lora()
        trainer = ChunkwiseTrainer(model=model, args=training_args(tmp_path / "chunkwise"), train_dataset=ListDataset(rows),
                                   chunkwise=ChunkwiseConfig(chunk_size=CHUNK))
    notes = [r.getMessage() for r in caplog.records if "prepare_model_for_kbit_training" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "use_gradient_checkpointing=False" in notes[0]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    trainer.train()
    chunkwise = {name: value - before[name] for name, value in lora_params(model).items()}

    plain_model = kbit_prepared_lora(use_gradient_checkpointing=False)
    Float64LossTrainer(model=plain_model, args=training_args(tmp_path / "plain"), train_dataset=ListDataset(rows)).train()
    plain = {name: value - before[name] for name, value in lora_params(plain_model).items()}
    assert all(update.abs().max() > 0 for update in plain.values())
    for name, update in plain.items():
        stored = 2 * torch.finfo(torch.float32).eps * before[name].abs().max().item()
        torch.testing.assert_close(chunkwise[name], update, rtol=RTOL, atol=stored + RTOL * update.abs().max().item(), msg=name)
