"""Per-rank memory of the training state — parameters, gradients, optimizer state — under DDP, DeepSpeed ZeRO-1/2/3
and FSDP2, as `chunkwise train` sets them up (`chunkwise.data_parallel`), for SeCO full fine-tuning with AdamW.

    python docs/bench/sharded_memory.py                       # runs every set-up on 2 CPU ranks, prints the table
    python docs/bench/sharded_memory.py --model quick --world 2 --json out.json

What is measured: the bytes of every tensor storage alive in a rank's Python process (found through the garbage
collector, each storage counted once), split into the model's parameters (the rank's own shard where they are
sharded), their gradients, and the rest: the optimizer state and the engine's own buffers (e.g. ZeRO's fp32
partitions and gradient buckets). Two moments of step 3 (AdamW's state exists after step 1):

* between steps, after the optimizer step: what the rank keeps for the whole run;
* at the step's last chunk backward, just before the gradients are reduced: chunk-wise training accumulates
  each parameter's gradient over the step's chunks and reduces once, so this is where the gradient is whole.

Autograd's saved activations are not Python objects and are not counted (one chunk's, the same for every set-up);
the KV cache is (a few MiB here). Memory held by C++ alone is not seen either — DDP's gradient buckets, a second
gradient-sized buffer — so the process's resident memory above its start (libraries loaded, no model) is given
too. Each set-up runs under its own `torchrun --standalone` launch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

MODES = {"ddp": {}, "zero1": {"zero": 1}, "zero2": {"zero": 2}, "zero3": {"zero": 3}, "fsdp": {"fsdp": True}}
LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP2"}


def _local(tensor):
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor  # a DTensor's shard


def _storages(tensors) -> dict[int, int]:
    found = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = _local(tensor).untyped_storage()
        if storage.nbytes() and storage.device.type != "meta":
            found[storage.data_ptr()] = storage.nbytes()
    return found


def resident_bytes() -> int:
    """The process's resident memory (Linux /proc): what the gc count misses, e.g. DDP's C++ gradient buckets."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model) -> dict[str, int]:
    """Bytes held by this process: parameters, gradients, everything else (each storage counted once)."""
    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed objects warns
        warnings.simplefilter("ignore")
        everything = _storages(obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
    parameters = list(model.parameters())
    # ZeRO-3 keeps each rank's partition in `ds_tensor`; the parameter itself is empty between uses.
    params = _storages([*parameters, *(getattr(p, "ds_tensor", None) for p in parameters)])
    grads = {k: v for k, v in _storages(p.grad for p in parameters).items() if k not in params}
    rest = {k: v for k, v in everything.items() if k not in params and k not in grads}
    return {"parameters": sum(params.values()), "gradients": sum(grads.values()), "other": sum(rest.values()), "resident": resident_bytes()}


def run_rank(mode: str, model_name: str, seq_len: int, chunk_size: int, output: Path) -> None:
    import torch

    from chunkwise import SeCO
    from chunkwise.recipes.train import distributed as data_parallel
    from chunkwise.tools.bench.measure import build_model

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # The same libraries loaded in every set-up before `start` (DeepSpeed's initialisation imports its Muon
    # optimizer module, and with it torch's compiler), so that the resident columns compare the training state.
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401

    start = resident_bytes()
    model = build_model(model_name, dtype=torch.float32, device=torch.device("cpu"))
    backend = data_parallel.setup(model, lambda ps: torch.optim.AdamW(ps, lr=1e-5), world_size=world,
                                  device=torch.device("cpu"), max_grad_norm=1.0, **MODES[mode])
    engine = SeCO(backend.engine_model, chunk_size=chunk_size)
    samples = {}
    reduce_backward = engine.sync.backward

    def sampled_backward(outputs, seeds, *, reduce):  # sample just before step 3's reducing backward
        if reduce and step == 3:
            samples["during"] = measure(model)
        return reduce_backward(outputs, seeds, reduce=reduce)

    engine.sync.backward = sampled_backward
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, 4):
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
        with backend.micro_batch(last=True):
            engine.backward(ids)
        backend.step(max_grad_norm=1.0, finite=lambda norm: True, scaler=torch.amp.GradScaler("cpu", enabled=False))
    samples["between"] = measure(model)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if rank == 0:
        output.write_text(json.dumps({"mode": mode, "world": world, "parameters": parameters, "start": start, **samples}))
    torch.distributed.barrier()
    os._exit(0)  # no gloo teardown (it sometimes aborts a finished process)


def table(results: list[dict]) -> str:
    mib = 1 << 20
    lines = [
        "| set-up | between steps: parameters | gradients | optimizer + engine buffers | **total** | resident above start "
        "| at the last backward: parameters | gradients | total | resident above start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        row = [LABELS[r["mode"]]]
        for moment, parts in (("between", ("parameters", "gradients", "other")), ("during", ("parameters", "gradients"))):
            sample = r[moment]
            total = sample["parameters"] + sample["gradients"] + sample["other"]
            row += [f"{sample[k] / mib:.0f}" for k in parts]
            row += [f"**{total / mib:.0f}**" if moment == "between" else f"{total / mib:.0f}", f"{(sample['resident'] - r['start']) / mib:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-56m")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--rank-mode", default=None, help=argparse.SUPPRESS)  # set by the driver for each launch
    parser.add_argument("--rank-output", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.rank_mode:
        run_rank(options.rank_mode, options.model, options.seq_len, options.chunk_size, Path(options.rank_output))
        return
    results = []
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        for mode in options.modes.split(","):
            output = Path(folder) / f"{mode}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(options.world),
                            __file__, "--model", options.model, "--seq-len", str(options.seq_len), "--chunk-size", str(options.chunk_size),
                            "--rank-mode", mode, "--rank-output", str(output)], check=True, env=environment, stdout=sys.stderr)
            results.append(json.loads(output.read_text()))
            print(f"{mode}: {results[-1]}", file=sys.stderr, flush=True)
    print(f"{options.model}: {results[0]['parameters']:,} parameters, float32, AdamW, {options.world} ranks; MiB per rank\n")
    print(table(results))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
