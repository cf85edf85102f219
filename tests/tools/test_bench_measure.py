"""`chunkwise bench`'s child side (`chunkwise.tools.bench.measure`): which errors it records as out of memory.

(Moved unchanged from tests/tools/test_bench.py when the harness split into case, measure, runner and report.)
"""

from chunkwise.tools.bench import measure as bench


def test_out_of_memory_errors_are_recognised():
    import torch

    assert bench.is_out_of_memory(MemoryError())
    assert bench.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not bench.is_out_of_memory(ValueError("out of memory"))  # only errors the allocators raise
