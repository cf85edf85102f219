"""What the Trainer tests share: rows with padding and -100 labels, the plain float64 Trainer they are compared
with, and the arguments of a one-step run (test_hf_trainer, test_sharded, test_plan)."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels

SEQ_LEN, CHUNK = 24, 5


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of SEQ_LEN tokens; odd rows are right-padded, every third has a -100 'prompt' prefix."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 128, (SEQ_LEN,), generator=g)
        mask = torch.ones(SEQ_LEN, dtype=torch.long)
        labels = ids.clone()
        if i % 2 == 1:
            pad = 3 + i % 5
            mask[-pad:] = 0
            ids[-pad:] = 0
            labels[-pad:] = IGNORE_INDEX
        if i % 3 == 0:
            labels[: 4 + i % 4] = IGNORE_INDEX
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


class Float64LossTrainer(Trainer):
    """Plain Trainer, loss in the model's dtype, following `Trainer.compute_loss`'s normalisation contract."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        targets = shift_labels(labels)
        normaliser = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        loss = chunk_loss_sum(outputs.logits, targets) / normaliser
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the count is global across ranks and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        optim="sgd",
        learning_rate=0.5,  # large, so a gradient error would show in the parameters
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.5,  # clipping active (grad norm ~2)
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def updates(after, before):
    return {name: after[name] - before[name] for name in before}

