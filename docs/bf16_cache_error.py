"""SeCO's bf16 gradient error with the KV cache kept in the autocast dtype, against full backprop's own.

    OMP_NUM_THREADS=1 .venv/bin/python docs/bf16_cache_error.py

For seeds 0-9 and two sequence lengths (tiny-llama, batch 2, chunk 8): the max relative gradient error
of full backprop and of SeCO under bf16 autocast (float32 weights) against the float64 gradient of the
same weights, and their ratio. tests/core/test_autocast.py bounds the ratio by 2.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import bf16_autocast_errors  # noqa: E402


def errors(seed: int, length: int, chunk: int) -> tuple[float, float]:
    input_ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(seed))
    full, seco, _ = bf16_autocast_errors(input_ids, seed=seed, chunk_size=chunk)
    return full, seco


if __name__ == "__main__":
    torch.set_num_threads(1)
    for length, chunk in [(48, 8), (192, 8)]:
        ratios = []
        for seed in range(10):
            full, seco = errors(seed, length, chunk)
            ratios.append(seco / full)
            print(f"{length} tokens, chunk {chunk}, seed {seed}: full {full:.3g}, seco {seco:.3g}, ratio {seco / full:.2f}")
        print(f"ratio {min(ratios):.2f}-{max(ratios):.2f}, mean {sum(ratios) / len(ratios):.2f}")
