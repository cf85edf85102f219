"""`chunkwise bench`: step time and peak memory per (method, length), each case in a fresh process.

    case.py     what a case and a run measure: StepOptions (the options both share), BenchCase, BenchSettings, CaseResult
    measure.py  one case measured in this process (the child: `python -m chunkwise.tools.bench.measure --case ...`)
    runner.py   the parent: a child per case, the grid, the longest length within a memory budget
    report.py   BenchReport and its outputs (bench.md, bench.json, bench.png)

The CLI imports the harness's names from here, not from its modules.
"""

from chunkwise.tools.bench.case import DEFAULT_MODEL, BenchSettings
from chunkwise.tools.bench.report import write_outputs
from chunkwise.tools.bench.runner import run_benchmark

__all__ = ["DEFAULT_MODEL", "BenchSettings", "run_benchmark", "write_outputs"]
