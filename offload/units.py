"""Byte sizes written the way accelerate writes them: "8GiB" = 8·2^30 bytes, "8GB" = 8·10^9 bytes."""
from __future__ import annotations

import re

from offload.errors import BudgetError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_memory_size(value: int | float | str, *, name: str = "gpu_memory", allow_zero: bool = False) -> int:
    """Bytes from an int, or a string such as ``"8GiB"``, ``"7.5GB"``, ``"512MiB"``, ``"1000000"``.
    ``allow_zero``: 0 is a valid size (``0``, ``"0"``, ``"0GB"`` and ``"0GiB"`` alike), e.g. a GPU
    budget of nothing; otherwise a size must be positive.

    >>> parse_memory_size("8GiB")
    8589934592
    >>> parse_memory_size("8GB")
    8000000000
    """
    if isinstance(value, bool):
        raise BudgetError(f"{name}: expected a byte count or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value or (value == 0 and not allow_zero):
            raise BudgetError(f"{name}: expected a {_size_kind(allow_zero)} number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"{name}: expected a byte count or a string like '8GiB', got {type(value).__name__}")
    match = _PATTERN.match(value)
    if match is None:
        raise BudgetError(
            f"{name}: cannot parse {value!r}; expected a positive number with an optional unit "
            f"(B, KB, MB, GB, TB = powers of 10; KiB, MiB, GiB, TiB = powers of 2), e.g. '8GiB'"
        )
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise BudgetError(
            f"{name}: unknown unit {match.group(2)!r} in {value!r}; expected one of "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    size = int(number * _UNITS[unit])
    if size < 0 or (size == 0 and not (allow_zero and number == 0)):
        raise BudgetError(f"{name}: expected a {_size_kind(allow_zero)} size, got {value!r}")
    return size


def _size_kind(allow_zero: bool) -> str:
    return "positive (or zero)" if allow_zero else "positive"


def format_bytes(size: int | float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"
