"""The safetensors header: its length prefix, its JSON, and every rule a valid one obeys.

A file is ``u64 little-endian N``, ``N`` bytes of UTF-8 JSON, then the data region. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
region) and may hold ``"__metadata__"``: str to str. Validation happens here, on bytes handed in;
this module reads no file itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .dtypes import DTYPES
from .errors import HeaderError, where

__all__ = ["MAX_HEADER_BYTES", "Header", "TensorInfo", "header_length", "parse_header"]

MAX_HEADER_BYTES = 100_000_000
_U64 = 2**64
_I64 = 2**63
_MAX_DIMS = 64  # numpy holds no more


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and length, stored dtype, shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Length of the first dimension; a 0-d tensor counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class Header:
    """A validated header: tensors in file order, metadata, where data starts, the file's size."""

    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def header_length(first8: bytes, file: str, file_size: int) -> int:
    """Check the 8-byte prefix against the file's size and return the header's length."""
    if file_size < 8 or len(first8) < 8:
        raise HeaderError(f"{where(file)}file is {file_size} bytes, shorter than the 8-byte prefix")
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"{where(file)}header length {n} exceeds the {MAX_HEADER_BYTES} limit")
    if 8 + n > file_size:
        raise HeaderError(
            f"{where(file)}header length {n} runs past the end of the file ({file_size} bytes)"
        )
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, file: str, file_size: int) -> Header:
    """Parse and validate header bytes (without the length prefix) of a file of ``file_size``."""
    data_start = 8 + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{where(file)}header is not valid UTF-8 ({e.reason})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise HeaderError(f"{where(file)}duplicate key {e.args[0]!r} in header") from None
    except RecursionError:
        raise HeaderError(f"{where(file)}header JSON is nested too deeply") from None
    except ValueError as e:
        raise HeaderError(f"{where(file)}header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{where(file)}header is a JSON {type(obj).__name__}, not an object")

    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(f"{where(file)}__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        shape, dtype, begin, end = _entry(entry, file, name)
        tensors[name] = TensorInfo(name, file, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()  # tensors in file order (the JSON's key order is not the data's)
    _check_tiling(spans, file_size - data_start, file)
    ordered = {name: tensors[name] for _, _, name in spans}
    return Header(file, ordered, dict(metadata), data_start, file_size)


def _entry(entry: object, file: str, name: str) -> tuple[tuple[int, ...], str, int, int]:
    at = where(file, name)
    if not isinstance(entry, dict):
        raise HeaderError(f"{at}entry is a JSON {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise HeaderError(f"{at}entry lacks {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise HeaderError(f"{at}dtype must be a string, got {dtype!r}")
    info = DTYPES.get(dtype)
    if info is None:
        # Not UnsupportedDtypeError: a name outside the format is a malformed header.
        raise HeaderError(f"{at}unknown dtype {dtype!r}: Unsupported tensor dtype")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"{at}shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o < _U64 for o in offsets)
    ):
        raise HeaderError(f"{at}data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{at}data_offsets [{begin}, {end}] end before they begin")
    if len(shape) > _MAX_DIMS:
        raise HeaderError(f"{at}shape has {len(shape)} dimensions, more than {_MAX_DIMS}")
    bits = info.bits
    extent = 8  # bytes of the widest element, times every non-zero dimension: what numpy holds
    for d in shape:  # stop as soon as a product leaves 63 bits: no huge numbers built
        bits *= d
        extent *= max(d, 1)
        if extent >= _I64:
            raise HeaderError(f"{at}shape {shape} of {dtype} overflows 64 bits")
    if bits % 8:
        raise HeaderError(f"{at}shape {shape} of {dtype} does not fill whole bytes")
    if end - begin != bits // 8:
        raise HeaderError(
            f"{at}data_offsets [{begin}, {end}] hold {end - begin} bytes, "
            f"shape {shape} of {dtype} needs {bits // 8}"
        )
    return tuple(shape), dtype, begin, end


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int, file: str) -> None:
    """The tensors, in offset order, must cover the data region exactly: no overlap, no hole."""
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a hole at {pos}"
            raise HeaderError(f"{where(file, name)}data_offsets [{begin}, {end}] {what}")
        pos = end
    if pos != data_len:
        raise HeaderError(
            f"{where(file)}tensors cover {pos} bytes of data but the file holds {data_len}"
        )
