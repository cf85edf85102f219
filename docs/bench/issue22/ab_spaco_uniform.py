"""SpaCO (uniform) / forward before and after stage-2 decisions (issue 22), the ratio measured inside one process.

Each version runs in its own process (PYTHONPATH selects the checkout; two versions of a package with absolute
imports cannot share one process), alternating old, new, old, new, ...; inside a process forward and SpaCO steps
alternate on one model and one input, one thread, after a warm-up. The ratio of CPU-time medians is printed.

    python docs/bench/issue22/ab_spaco_uniform.py OLD_CHECKOUT NEW_CHECKOUT MODEL_DIR [processes per version]
"""

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, time, torch
from transformers import AutoModelForCausalLM
from chunkwise import SpaCO
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
ids = torch.randint(0, model.config.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(0))
engine = SpaCO(model, chunk_size=128, budget=8, sampling="uniform", seed=0)
def forward():
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
def spaco():
    engine.backward(ids); model.zero_grad(set_to_none=True)
times = {"forward": [], "spaco": []}
forward(); spaco()  # warm-up: kernels chosen and self-checked, allocator primed
for r in range(ROUNDS):
    for name, step in (("forward", forward), ("spaco", spaco)) if r % 2 == 0 else (("spaco", spaco), ("forward", forward)):
        start = time.process_time(); step(); times[name].append(time.process_time() - start)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def run(checkout: str, model: str, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
    code = CHILD.replace("MODEL", repr(model)).replace("ROUNDS", str(rounds))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    old, new, model = sys.argv[1:4]
    processes = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    ratios = {"old": [], "new": []}
    for _ in range(processes):
        for label, checkout in (("old", old), ("new", new)):
            medians = run(checkout, model, rounds=4)
            ratios[label].append(medians["spaco"] / medians["forward"])
            print(label, f"forward {medians['forward']:.3f} s, spaco {medians['spaco']:.3f} s CPU, ratio {ratios[label][-1]:.3f}", flush=True)
    for label, values in ratios.items():
        print(f"{label}: SpaCO / forward median {statistics.median(values):.3f} over {len(values)} processes", flush=True)


if __name__ == "__main__":
    main()
