"""Memory: sizes (parse "24GiB", print one way everywhere), what is free, and meters of a process's peak.

Every size chunkwise prints goes through `format_bytes`; every size it reads from the user through
`parse_bytes` (binary units: 1K = 1024 bytes).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import torch

from chunkwise.utils.sizes import GiB, MiB, format_bytes, parse_bytes  # noqa: F401  (re-exported: sizes live here too)

# ----- what is free, what was used ---------------------------------------------------------------------


def host_available_memory() -> int:
    """Available host memory (Linux's MemAvailable, through psutil), shared among this machine's ranks.

    On a CPU this is the planner's "free memory": what the process can still take without swapping,
    page cache included. torchrun's LOCAL_WORLD_SIZE processes share it, so each gets its part.
    """
    import psutil

    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA's allocator peak on a GPU, peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----- meters with a resettable peak (the benchmark's, the probes') -------------------------------------


def _proc_status_bytes(key: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, VmSize) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} field")


class CpuMemory:
    """Resident memory of this process. Needs Linux's /proc; the peak is reset through clear_refs."""

    def __init__(self):
        self.resettable = self._clear_refs()
        self.method = "VmHWM-VmRSS, peak reset by clear_refs" if self.resettable else "VmHWM-VmRSS, peak since start"
        if "MALLOC_MMAP_THRESHOLD_" in os.environ:
            self.method += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"

    @staticmethod
    def _clear_refs() -> bool:
        # Writing "5" resets the peak resident set (VmHWM) to the current resident set (Linux >= 4.0).
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        return _proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.resettable:
            self._clear_refs()

    def peak(self) -> int:
        return _proc_status_bytes("VmHWM")


class CudaMemory:
    """Bytes held by tensors in PyTorch's CUDA caching allocator (not its reserved-but-free cache)."""

    method = "cuda max_memory_allocated - memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable field")


def limit_memory(device: torch.device, extra_bytes: int | None) -> Callable[[], None]:
    """Cap what this process may allocate beyond now; return a function that lifts the cap.

    CPU: an address-space limit (RLIMIT_AS) of the current virtual size plus the allowance, so that an
    allocation past it fails inside this process (torch raises "can't allocate memory"). Address space
    is not resident memory, so the limit is a guard, not the measurement.
    CUDA: the caching allocator's per-process fraction, which raises torch.OutOfMemoryError.
    """
    if device.type == "cuda":
        if extra_bytes is None:
            return lambda: None
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + extra_bytes) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return lambda: torch.cuda.set_per_process_memory_fraction(1.0, device)

    if extra_bytes is None:
        extra_bytes = int(0.9 * _available_memory())  # a guard for the machine, not a budget
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _proc_status_bytes("VmSize") + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


_TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from 2.5


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception means the step ran out of memory (CUDA, Python, or torch's CPU allocator)."""
    if isinstance(error, (MemoryError, _TORCH_OOM)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        text in message for text in ("can't allocate memory", "Cannot allocate memory", "out of memory", "not enough memory")
    )
