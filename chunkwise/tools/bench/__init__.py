"""`chunkwise bench`: step time and peak memory per (method, length), each case in a fresh process.

The CLI imports the harness's names from here, not from its modules.
"""

from chunkwise.tools.bench.runner import DEFAULT_MODEL, BenchSettings, run_benchmark, write_outputs

__all__ = ["DEFAULT_MODEL", "BenchSettings", "run_benchmark", "write_outputs"]
