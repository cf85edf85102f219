"""Long-context probes on the demo model and on a tiny random model: accuracy and memory per length.

    make demo                                   # runs/demo: the demo model (2048-token training)
    .venv/bin/python docs/probes.py             # about 25 minutes on 2 shared CPU cores; writes docs/probes/

Each measurement is one `chunkwise eval --task passkey` command (printed), run in its own process with one
thread and glibc's mmap threshold fixed at 16 KiB, so that the resident set follows live tensors (as
`chunkwise bench` runs its cases; see `bench.child_environment`). The tiny random model is a 2-layer Llama
(hidden 64) with a byte-level BPE tokenizer trained here on a few English sentences (the one
tests/tokenizer_fixtures.py trains for the tests), saved to runs/probe-tiny-random: a model folder like any user's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "probes"
TINY = ROOT / "runs" / "probe-tiny-random"
RUNS = [
    # memory at three lengths (and a coarse accuracy): one probe per depth
    ("demo-passkey", ["--model", "runs/demo", "--task", "passkey", "--seq-len", "2048,16384,65536", "--depths", "0,0.5,1",
                      "--num-probes", "1", "--chunk-size", "1024"]),
    ("tiny-random-passkey", ["--model", str(TINY.relative_to(ROOT)), "--task", "passkey", "--seq-len", "4096,16384,65536",
                             "--depths", "0.5", "--num-probes", "1", "--chunk-size", "1024"]),
    ("demo-passkey-chunk256", ["--model", "runs/demo", "--task", "passkey", "--seq-len", "4096,16384,65536", "--depths", "0.5",
                               "--num-probes", "1", "--chunk-size", "256"]),
    # accuracy heat maps where the demo model can answer: up to twice its training length
    ("demo-passkey-short", ["--model", "runs/demo", "--task", "passkey", "--seq-len", "1024,2048,4096",
                            "--depths", "0,0.25,0.5,0.75,1", "--num-probes", "4", "--chunk-size", "1024"]),
    ("demo-needle-short", ["--model", "runs/demo", "--task", "needle", "--seq-len", "1024,2048,4096",
                           "--depths", "0,0.25,0.5,0.75,1", "--num-probes", "4", "--chunk-size", "1024"]),
]


def build_tiny_random_model() -> None:
    """A 2-layer Llama, hidden 64, random weights, 64K positions, with a locally trained BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import bpe_tokenizer  # noqa: E402  (the tokenizer the tests train)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=65536)
    LlamaForCausalLM(config).save_pretrained(TINY)
    bpe_tokenizer().save_pretrained(TINY)


def main() -> None:
    if not (ROOT / "runs" / "demo").is_dir():
        sys.exit("runs/demo is missing: train the demo first (make demo)")
    if not TINY.is_dir():
        build_tiny_random_model()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    only = set(sys.argv[1:])
    for name, options in RUNS:
        if only and name not in only:
            continue
        command = ["chunkwise", "eval", *options, "--output", f"docs/probes/{name}", "--json"]
        print(" ".join(command), flush=True)
        executable = [str(Path(sys.executable).parent / "chunkwise"), *command[1:]]
        result = subprocess.run(executable, cwd=ROOT, env=environment, capture_output=True, text=True, check=True)
        report = json.loads(result.stdout)
        report["command"] = " ".join(command)
        (OUTPUT / name / f"{report['task']}.json").write_text(json.dumps(report, indent=1) + "\n")
        for cost in report["costs"]:
            print(f"  {cost['length']:>6}: peak {cost['peak_memory_bytes'] / 2**20:.1f} MiB, KV {cost['kv_cache_bytes'] / 2**20:.1f} MiB, "
                  f"rest {cost['other_bytes'] / 2**20:.1f} MiB, {cost['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
