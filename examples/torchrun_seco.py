"""Data-parallel SeCO training with plain PyTorch DDP, launched by torchrun.

    torchrun --nproc_per_node 2 examples/torchrun_seco.py            # CPU (gloo) or one GPU per rank (nccl)

Each rank trains its own long sequences chunk by chunk; gradients are all-reduced once per step.
Replace the tiny model and random tokens with your own (AutoModelForCausalLM.from_pretrained, a dataset).
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from chunkwise import SeCO
from chunkwise.models import build_tiny_model

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

model = build_tiny_model("tiny-llama", seed=0).to(device)  # same initial weights on every rank
ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
engine = SeCO(ddp, chunk_size=256)  # pass the DDP wrapper: the engine syncs once per step
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

generator = torch.Generator().manual_seed(rank)  # each rank its own data
for step in range(5):
    input_ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=generator)
    out = engine.backward(input_ids)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if rank == 0:
        print(f"step {step}: loss {out.loss.item():.4f} ({out.num_chunks} chunks per sequence)")
del engine, ddp  # release DDP's reducer before its process group goes away
dist.destroy_process_group()
