"""Byte sizes written for people: ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, or a plain int."""

from __future__ import annotations

import re

__all__ = ["parse_bytes"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(value: int | str | None) -> int | None:
    """A byte count from an int or a string with a unit; None stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"a byte size must be an int or a string, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a byte size must be an int or a string, got {value!r}")
    m = _SIZE.fullmatch(value)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (try '512MiB', '2GiB' or '1.5GB')")
    return int(float(m.group(1)) * _UNITS[unit])
