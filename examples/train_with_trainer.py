"""Fine-tune with transformers' Trainer, chunk by chunk: a tiny Llama on random 256-token rows, on CPU.

Run: python examples/train_with_trainer.py   (no download; swap in your model, dataset and TrainingArguments)

With DeepSpeed ZeRO-2 (the paper's multi-GPU set-up; 2 CPU processes here, one per GPU on GPUs):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/train_with_trainer.py --deepspeed examples/deepspeed_zero2.json
"""

import sys

import torch
from transformers import TrainingArguments

from chunkwise.hf import ChunkwiseConfig, ChunkwiseTrainer
from chunkwise.models.presets import build_tiny_model

model = build_tiny_model("tiny-llama")  # or AutoModelForCausalLM.from_pretrained(...), or a PEFT model
rows = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)} for ids in torch.randint(0, 128, (16, 256))]

args = TrainingArguments(output_dir="/tmp/chunkwise-example", max_steps=8, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[],
                         use_cpu=not torch.cuda.is_available(),
                         deepspeed=sys.argv[sys.argv.index("--deepspeed") + 1] if "--deepspeed" in sys.argv else None)
trainer = ChunkwiseTrainer(model=model, args=args, train_dataset=rows[:12], eval_dataset=rows[12:],
                           chunkwise=ChunkwiseConfig(method="seco", chunk_size=64))  # or method="spaco", budget=2
trainer.train()
print("eval_loss", trainer.evaluate()["eval_loss"])
