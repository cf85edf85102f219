"""Packed / padding-free batches through the Trainer routes: one step's gradient is each document trained alone.

* `ChunkwiseTrainer` with transformers' `DataCollatorWithFlattening` (input_ids, labels with each document's
  first label -100, position_ids restarting at 0; with and without its FlashAttention keys cu_seq_lens_* /
  max_length_* and seq_idx).
* `ChunkwiseTrainerMixin` in front of TRL's `SFTTrainer` with `packing=True` (best-fit packing, padding-free).

The gradient Trainer hands the optimizer (captured in `on_pre_optimizer_step`, clipping off) is compared with the
float64 per-document reference (`packing_reference.per_document_backward`: each document alone through one full
forward, token losses summed, one normaliser): relative 1e-10. The documents in the collated batch are checked to
be exactly the dataset's, so the reference does not just repeat what the collator did. TRL's own loss is no
exactness reference (its fused head computes in float32).
"""

from __future__ import annotations

import copy

import pytest
import torch
from packing_reference import documents_of, per_document_backward
from reference import max_relative_error
from trainer_helpers import ListDataset, training_args
from transformers import DataCollatorWithFlattening, TrainerCallback

from chunkwise.hf import ChunkwiseTrainer, ChunkwiseTrainerMixin
from chunkwise.integrations.trainer import ChunkwiseConfig
from chunkwise.models.presets import build_tiny_model

TOL = 1e-10
LENGTHS = [9, 1, 14, 6, 3]  # 33 tokens with chunk 5: boundaries inside chunks and on an edge (9 + 1 = 10)


class Gradients(TrainerCallback):
    """Copies of the trainable gradients just before the optimizer step, and the batches the step saw."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def documents(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=generator).tolist() for n in LENGTHS]


def recording(trainer_class):
    """`trainer_class` that keeps each batch `training_step` receives (as collated, on CPU)."""

    class Recording(trainer_class):
        batches: list

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.batches = getattr(self, "batches", []) + [{k: v for k, v in inputs.items()}]
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def check_against_reference(model, batch, labels_key, grads, docs):
    """The batch holds exactly `docs` as its documents, and `grads` equal the per-document reference."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    found = sorted(ids[row, s:e].tolist() for row, spans in enumerate(documents_of(positions)) for s, e in spans)
    assert found == sorted(docs)
    _, reference = per_document_backward(model, ids, positions, labels=batch[labels_key])
    error = max_relative_error(grads, reference)
    assert error <= TOL, f"max relative gradient error {error:.3g}"


@pytest.mark.parametrize("flash_keys", [False, True], ids=["plain", "with-varlen-keys"])
def test_chunkwise_trainer_with_the_flattening_collator(tmp_path, flash_keys):
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    initial = copy.deepcopy(model)
    docs = documents()
    rows = [{"input_ids": d, "labels": [-100] * min(2, len(d) - 1) + d[min(2, len(d) - 1):]} for d in docs]  # prompt-like -100s
    callback = Gradients()
    trainer = recording(ChunkwiseTrainer)(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=len(rows), max_grad_norm=0.0, remove_unused_columns=False),
        train_dataset=ListDataset(rows),
        data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=flash_keys, return_seq_idx=flash_keys),
        callbacks=[callback],
        chunkwise=ChunkwiseConfig(chunk_size=5),
    )
    trainer.train()
    (batch,) = trainer.batches
    assert ("cu_seq_lens_q" in batch) == flash_keys
    check_against_reference(initial, batch, "labels", callback.grads, docs)


def test_varlen_keys_that_disagree_with_position_ids_are_refused(tmp_path):
    from chunkwise.integrations.trainer import _engine_inputs

    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in documents()])
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_q"].flip(0)
    with pytest.raises(ValueError, match="the batch's cu_seq_lens_q does not match the documents its position_ids restart at"):
        _engine_inputs(batch, "labels")


def test_sft_trainer_with_packing(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizer_fixtures import word_tokenizer

    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    initial = copy.deepcopy(model)
    docs = documents(seed=1)
    config = trl.SFTConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=8,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
        activation_checkpointing=False, packing=True, max_length=64, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    assert config.packing_strategy == "bfd"  # best-fit packing, padding-free
    callback = Gradients()
    trainer = recording(type("ChunkwiseSFT", (ChunkwiseTrainerMixin, trl.SFTTrainer), {}))(
        model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": docs}), processing_class=word_tokenizer(),
        callbacks=[callback], chunkwise=ChunkwiseConfig(chunk_size=5),
    )
    assert trainer.padding_free
    trainer.train()
    (batch,) = trainer.batches
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "cu_seq_lens_q" in batch  # one flattened row
    check_against_reference(initial, batch, "labels", callback.grads, docs)


def test_chunked_evaluation_of_a_packed_batch(tmp_path):
    """`prediction_step` scores the flattened row chunk by chunk, each document alone: the per-document loss."""
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    docs = documents(seed=2)
    collator = DataCollatorWithFlattening()
    trainer = ChunkwiseTrainer(
        model=model,
        args=training_args(tmp_path, per_device_eval_batch_size=len(docs), prediction_loss_only=True, remove_unused_columns=False),
        eval_dataset=ListDataset([{"input_ids": d} for d in docs]),
        data_collator=collator,
        chunkwise=ChunkwiseConfig(chunk_size=5),
    )
    loss = trainer.evaluate()["eval_loss"]
    batch = collator([{"input_ids": d} for d in docs])
    reference, _ = per_document_backward(model, batch["input_ids"], batch["position_ids"], labels=batch["labels"])
    assert abs(loss - reference.item()) <= TOL * reference.item()
