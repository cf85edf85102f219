"""Data-parallel SeCO training in your own loop, launched by torchrun: DDP, DeepSpeed ZeRO, or FSDP2.

    torchrun --nproc_per_node 2 examples/torchrun_seco.py              # DDP: CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc_per_node 2 examples/torchrun_seco.py --zero 2     # DeepSpeed ZeRO-2 (pip install 'chunkwise[deepspeed]')
    torchrun --nproc_per_node 2 examples/torchrun_seco.py --fsdp       # FSDP2: fully_shard on each layer and the model

Each rank trains its own long sequences chunk by chunk; the engine is given the wrapper (DDP module, DeepSpeed
engine, or the sharded model) and reduces the gradients once per step, after the step's last chunk.
Replace the tiny model and random tokens with your own (AutoModelForCausalLM.from_pretrained, a dataset).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from chunkwise import SeCO
from chunkwise.models.presets import build_tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("--zero", type=int, choices=[1, 2, 3], help="DeepSpeed ZeRO stage instead of DDP")
parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
options = parser.parse_args()

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
model = build_tiny_model("tiny-llama", seed=0).to(device)  # same initial weights on every rank

if options.zero:
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed()  # joins the process group above
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": options.zero}}
    wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
    optimizer_step = wrapped.step  # DeepSpeed clips (gradient_clipping), steps and clears the gradients
else:
    if options.fsdp:
        from chunkwise.core.sync import shard_fsdp2

        wrapped = shard_fsdp2(model)  # each decoder layer, then the model: parameters become DTensor shards
    else:
        wrapped = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after sharding: it holds the shards

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

engine = SeCO(wrapped, chunk_size=256)  # pass the wrapper: the engine reduces the gradients once per step
generator = torch.Generator().manual_seed(rank)  # each rank its own data
for step in range(5):
    input_ids = torch.randint(0, model.config.vocab_size, (1, 2048), generator=generator)
    out = engine.backward(input_ids.to(device))
    optimizer_step()
    if rank == 0:
        print(f"step {step}: loss {out.loss.item():.4f} ({out.num_chunks} chunks per sequence)")
del engine, wrapped  # release DDP's reducer before its process group goes away
dist.destroy_process_group()
