"""Sizes: parse "24GiB" from the user, print bytes one way everywhere (binary units: 1K = 1024 bytes).

Apart from the meters in `chunkwise.utils.memory` (which re-exports these) because it imports nothing heavy: the
command line checks `--memory` before torch is imported.
"""

from __future__ import annotations

import re

GiB = 1 << 30
MiB = 1 << 20

# Binary units, as memory is counted: 1K = 1024 bytes.
_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, option: str) -> int:
    """`1073741824`, `1024M`, `1GiB`, `1.5G` -> bytes (binary units); `option` names the setting in the error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{option} must be a positive number of bytes such as 2147483648, 2048M or 2GiB; got {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).upper()])


def format_bytes(count: int) -> str:
    """Bytes as GiB with two decimals, or MiB below 0.1 GiB."""
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / MiB:.1f} MiB"
