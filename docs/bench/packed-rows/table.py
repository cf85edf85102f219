"""The packed-rows table of docs/benchmarks.md from the bench.json files in this folder (run from the repository root)."""

import json
from pathlib import Path

HERE = Path(__file__).parent
ROWS = {"cross": "32K, one stream (attention across documents)", "uniform": "8 x 4K documents", "mixed": "1K-16K documents"}

for model in ("quick", "quick-wide"):
    cross = None
    for row, label in ROWS.items():
        result = json.loads((HERE / f"{model}-{row}" / "bench.json").read_text())
        case, load = result["results"][0], result["machine"]["load_average_at_start"]
        cpu = case["step_cpu_s"][0]
        cross = cross or (case["time_s"], cpu, case["peak_memory_bytes"])
        print(f"| `{model}` | {label} | {case['time_s']:.1f} | {cpu:.1f} | {cross[1] / cpu:.2f} | "
              f"{case['peak_memory_bytes'] / 2**20:.1f} | {case['loss']:.4f} | {load[0]:.1f} |")

# The attention share the CPU times imply: the uniform row has `kept` of the cross row's query-key pairs and the same
# other work, so cross - uniform = (1 - kept) x the cross row's attention.
MIXED = (1024, 16384, 2048, 8192, 1024, 4096)


def pairs(lengths):
    return sum(n * (n + 1) // 2 for n in lengths)


kept, kept_mixed = pairs((4096,) * 8) / pairs((32768,)), pairs(MIXED) / pairs((32768,))
print(f"pairs kept: uniform {kept:.4f}, mixed {kept_mixed:.4f}")
for model in ("quick", "quick-wide"):
    cpu = {row: json.loads((HERE / f"{model}-{row}" / "bench.json").read_text())["results"][0]["step_cpu_s"][0] for row in ROWS}
    attention = (cpu["cross"] - cpu["uniform"]) / (1 - kept)
    rest = cpu["cross"] - attention
    print(f"{model}: attention {attention:.1f} s = {attention / cpu['cross']:.1%} of the cross step; "
          f"{attention * kept:.1f} s = {attention * kept / cpu['uniform']:.1%} of the uniform step; "
          f"mixed predicted {rest + attention * kept_mixed:.1f} s, measured {cpu['mixed']:.1f} s")
