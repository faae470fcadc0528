"""Safetensors dtype strings, their numpy types, and conversion into float16.

Every one of the 22 dtype strings of the format is known here with its width in bits, so a header
can be validated whatever it holds; which of them can be read, and into what, is decided here too.
"""

from __future__ import annotations

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


def convert_into(raw: memoryview | bytearray | np.ndarray, source: DType, out: np.ndarray) -> int:
    """Convert ``raw`` little-endian bytes of ``source`` dtype into ``out`` (same element count).

    Returns how many finite source values became infinite: values beyond float16's range.
    """
    assert source.numpy is not None
    src = np.frombuffer(raw, dtype=source.numpy.newbyteorder("<"))
    if out.dtype == src.dtype:
        out[...] = src.reshape(out.shape)
        return 0
    flat = out.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(flat, src, casting="unsafe")
    if out.dtype != _FLOAT16 or (src.dtype.itemsize == 1 and source.name != "F8_E8M0"):
        return 0  # fp8 types other than E8M0 fit inside float16's range
    # The output chunk is still in cache, so looking for infinities there is cheap; the source
    # is scanned only when there is one, to tell overflow from infinities already stored.
    if not np.isinf(flat).any():
        return 0
    return int(np.count_nonzero(np.isinf(flat))) - int(np.count_nonzero(np.isinf(src)))
