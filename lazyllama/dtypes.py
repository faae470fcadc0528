"""Safetensors dtype strings, their numpy types, and conversion into float16.

Every one of the 22 dtype strings of the format is known here with its width in bits, so a header
can be validated whatever it holds; which of them can be read, and into what, is decided here too.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from .errors import UnsupportedDtypeError, where

__all__ = ["DTYPES", "DType", "convert_into", "output_dtype"]

FLOAT16_MAX_FINITE = 65504.0


@dataclass(frozen=True, slots=True)
class DType:
    """One safetensors dtype: its width, the numpy type that holds it (if any), float or not."""

    name: str
    bits: int
    numpy: np.dtype[np.generic] | None
    is_float: bool


def _d(name: str, bits: int, np_type: Any, is_float: bool) -> DType:
    return DType(name, bits, None if np_type is None else np.dtype(np_type), is_float)


# F4 and the F6 types are packed below a byte; numpy cannot address their elements, so they are
# validated and reported but not read.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _d("BOOL", 8, np.bool_, False),
        _d("U8", 8, np.uint8, False),
        _d("I8", 8, np.int8, False),
        _d("U16", 16, np.uint16, False),
        _d("I16", 16, np.int16, False),
        _d("U32", 32, np.uint32, False),
        _d("I32", 32, np.int32, False),
        _d("U64", 64, np.uint64, False),
        _d("I64", 64, np.int64, False),
        _d("F16", 16, np.float16, True),
        _d("BF16", 16, ml_dtypes.bfloat16, True),
        _d("F32", 32, np.float32, True),
        _d("F64", 64, np.float64, True),
        _d("C64", 64, np.complex64, False),
        _d("F8_E4M3", 8, ml_dtypes.float8_e4m3fn, True),
        _d("F8_E5M2", 8, ml_dtypes.float8_e5m2, True),
        _d("F8_E8M0", 8, ml_dtypes.float8_e8m0fnu, True),
        _d("F8_E4M3FNUZ", 8, ml_dtypes.float8_e4m3fnuz, True),
        _d("F8_E5M2FNUZ", 8, ml_dtypes.float8_e5m2fnuz, True),
        _d("F4", 4, None, True),
        _d("F6_E2M3", 6, None, True),
        _d("F6_E3M2", 6, None, True),
    )
}

_FLOAT16 = np.dtype(np.float16)


def output_dtype(
    source: DType, target: np.dtype[np.generic] | None, file: str, tensor: str
) -> np.dtype[np.generic]:
    """The dtype a tensor of ``source`` dtype is returned in, or ``UnsupportedDtypeError``.

    ``target=None`` keeps the stored dtype; float16 accepts every floating source numpy can hold.
    """
    if source.numpy is None:
        raise UnsupportedDtypeError(
            f"{where(file, tensor)}Unsupported tensor dtype {source.name}: "
            "sub-byte packed types cannot be read"
        )
    if target is None or target == source.numpy:
        return source.numpy
    if target == _FLOAT16 and source.is_float:
        return _FLOAT16
    raise UnsupportedDtypeError(
        f"{where(file, tensor)}Unsupported tensor dtype {source.name} "
        f"for conversion to {target.name}"
    )


_BLOCK = 1 << 19  # elements converted at a time: few calls for Python, blocks near L2 size
_scratch = threading.local()


def _block_scratch() -> tuple[np.ndarray, np.ndarray]:
    """A block of uint16 (intermediate bits) and one of bool (a mask), per thread."""
    bufs: tuple[np.ndarray, np.ndarray] | None = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = (np.empty(_BLOCK, np.uint16), np.empty(_BLOCK, np.bool_))
    return bufs


@functools.cache
def _bf16_table() -> np.ndarray:
    """float16 bits of every bfloat16 bit pattern, as ml_dtypes converts them."""
    with np.errstate(over="ignore"):
        every = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)
        table: np.ndarray = every.astype(np.float16).view(np.uint16)
    return table


def _bf16_to_f16(src: np.ndarray, out: np.ndarray) -> int:
    """bfloat16 → float16 bits, equal to ml_dtypes' cast, returning the overflow count.

    Where the exponent is normal in float16 the result is exact, since bfloat16's 7 mantissa
    bits fit in float16's 10: ``sign | ((bits << 3) - 0xC000)`` modulo 2**16. The rare rest
    (zeros, subnormals, overflow, inf, NaN) is looked up in a table built with ml_dtypes. Plain
    integer ufuncs release the GIL, so every core converts at once; ml_dtypes' cast does not.
    """
    table = _bf16_table()
    scratch, outside = _block_scratch()
    overflow = 0
    for start in range(0, src.size, _BLOCK):
        s = src[start : start + _BLOCK]
        o = out[start : start + _BLOCK]
        t, m = scratch[: s.size], outside[: s.size]
        np.left_shift(s, 3, out=o)
        np.subtract(o, 0xC000, out=o)
        np.bitwise_and(s, 0x8000, out=t)
        np.bitwise_or(o, t, out=o)
        np.bitwise_and(s, 0x7F80, out=t)
        np.subtract(t, 0x3880, out=t)  # (exponent - 113) << 7, wrapping below 113
        np.greater(t, 0x0E80, out=m)  # exponent outside float16's normal range: in most blocks
        rare = np.flatnonzero(m)  # of real weights, some value is that small
        if rare.size:
            bits = s[rare]
            o[rare] = table[bits]
            exponent = (bits >> 7) & 0xFF
            overflow += int(np.count_nonzero((exponent >= 143) & (exponent < 255)))
    return overflow


def convert_into(raw: memoryview | bytearray | np.ndarray, source: DType, out: np.ndarray) -> int:
    """Convert ``raw`` little-endian bytes of ``source`` dtype into ``out`` (same element count).

    Returns how many finite source values became infinite: values beyond float16's range.
    """
    assert source.numpy is not None
    src = np.frombuffer(raw, dtype=source.numpy.newbyteorder("<"))
    flat = out.reshape(-1)
    if out.dtype == src.dtype:
        flat[...] = src
        return 0
    if source.name == "BF16" and out.dtype == _FLOAT16:
        return _bf16_to_f16(src.view(np.uint16), flat.view(np.uint16))
    with np.errstate(over="ignore", invalid="ignore"):
        if src.dtype.type in (np.float32, np.float64):
            np.copyto(flat, src, casting="unsafe")
        else:  # block by block: astype spread over threads better than one copyto here
            for start in range(0, src.size, _BLOCK):
                flat[start : start + _BLOCK] = src[start : start + _BLOCK].astype(out.dtype)
    if out.dtype != _FLOAT16 or (src.dtype.itemsize == 1 and source.name != "F8_E8M0"):
        return 0  # fp8 types other than E8M0 fit inside float16's range
    # The output is looked at for infinities first (cheap); the source is scanned only when
    # there is one, to tell overflow from infinities already stored.
    if (flat.view(np.uint16) & 0x7FFF).max(initial=0) < 0x7C00:  # no inf or NaN: fast
        return 0
    return int(np.count_nonzero(np.isinf(flat))) - int(np.count_nonzero(np.isinf(src)))
