"""Device and precision choice: `--device` and `--dtype` as torch reads them.

torch is imported where it is used, so that the command line can check `--dtype` before loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU; other names as torch reads them."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return device


PRECISIONS = ("auto", "float32", "bfloat16", "float16", "float64")


def training_dtypes(precision: str, device: torch.device, *, frozen_base: bool = False):
    """`(weights dtype, autocast dtype or None)` for a precision name.

    "auto" is bfloat16 on a GPU that supports it, float32 otherwise. bfloat16/float16 are autocast with
    float32 weights (the optimizer updates float32 master weights), except frozen base weights under
    LoRA, which are stored in the low precision to halve their memory (the adapter stays float32).
    "float64" is for exactness checks: float64 weights, no autocast.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if precision in ("float32", "float64"):
        return getattr(torch, precision), None
    low = getattr(torch, precision)
    return (low if frozen_base else torch.float32), low
