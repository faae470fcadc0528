"""Each dtype read against the oracle, bit for bit: `safetensors` plus an ml_dtypes cast."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lazyllama import UnsupportedDtypeError
from lazyllama.dtypes import DTYPES
from lazyllama.writer import save_file

from .conftest import ORACLE_DTYPES, oracle, oracle_f16, same_bits, st_save

FLOATS = [
    "F16",
    "BF16",
    "F32",
    "F64",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
]
NON_FLOATS = ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "C64"]


def test_all_22_dtype_strings_are_known() -> None:
    assert set(DTYPES) == set(FLOATS) | set(NON_FLOATS) | {"F4", "F6_E2M3", "F6_E3M2"}
    assert len(DTYPES) == 22


def sample(dtype_name: str, rng: np.random.Generator) -> np.ndarray:
    """Values of every kind the dtype holds: all bit patterns for 8- and 16-bit floats,
    normal values plus extremes for the wider ones."""
    dt = np.dtype(ORACLE_DTYPES[dtype_name])
    if dtype_name in ("BF16", "F16"):
        return np.arange(2**16, dtype=np.uint16).view(dt).reshape(256, 256)
    if dt.itemsize == 1 and dtype_name.startswith("F8"):
        return np.arange(256, dtype=np.uint8).view(dt).reshape(16, 16)
    if dtype_name in ("F32", "F64"):
        v = rng.standard_normal(4096) * 10.0 ** rng.integers(-9, 6, 4096)
        v[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 6e-8]
        return v.astype(dt).reshape(64, 64)
    if dtype_name == "BOOL":
        return rng.integers(0, 2, (8, 8)).astype(bool)
    if dtype_name == "C64":
        return (rng.standard_normal((8, 8)) + 1j * rng.standard_normal((8, 8))).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, (8, 8), dtype=dt, endpoint=True)


@pytest.mark.parametrize("writer", ["safetensors", "lazyllama"])
@pytest.mark.parametrize("dtype_name", FLOATS)
def test_floats_convert_to_float16_bit_for_bit(
    tmp_path: Path, open_model, writer: str, dtype_name: str
) -> None:
    rng = np.random.default_rng(len(dtype_name))
    f = tmp_path / "t.safetensors"
    (st_save if writer == "safetensors" else save_file)({"t": sample(dtype_name, rng)}, f)
    m = open_model(f, on_overflow="ignore")
    got = m["t"].load()
    assert got.dtype == np.float16
    assert same_bits(got, oracle_f16(f)["t"])


@pytest.mark.parametrize("dtype_name", FLOATS + NON_FLOATS)
def test_dtype_none_keeps_the_stored_dtype(tmp_path: Path, open_model, dtype_name: str) -> None:
    f = st_save({"t": sample(dtype_name, np.random.default_rng(1))}, tmp_path / "t.safetensors")
    got = open_model(f, dtype=None)["t"].load()
    assert same_bits(got, oracle(f)["t"])


@pytest.mark.parametrize("dtype_name", NON_FLOATS)
def test_non_floats_refuse_float16(tmp_path: Path, open_model, dtype_name: str) -> None:
    f = st_save({"ids": sample(dtype_name, np.random.default_rng(2))}, tmp_path / "t.safetensors")
    m = open_model(f)
    with pytest.raises(UnsupportedDtypeError) as info:
        m["ids"].load()
    msg = str(info.value)
    assert "Unsupported tensor dtype" in msg and dtype_name in msg
    assert str(f) in msg and "'ids'" in msg


@pytest.mark.parametrize(("dtype_name", "shape", "nbytes"), [("F4", [4], 2), ("F6_E2M3", [4], 3)])
@pytest.mark.parametrize("dtype", ["float16", None])
def test_packed_sub_byte_dtypes_are_refused_on_read(
    tmp_path: Path, open_model, dtype_name: str, shape: list, nbytes: int, dtype: str | None
) -> None:
    body = json.dumps({"p": {"dtype": dtype_name, "shape": shape, "data_offsets": [0, nbytes]}})
    f = tmp_path / "p.safetensors"
    f.write_bytes(struct.pack("<Q", len(body)) + body.encode() + b"\0" * nbytes)
    m = open_model(f, dtype=dtype)
    assert m["p"].shape == tuple(shape)  # the header is valid and reported
    with pytest.raises(UnsupportedDtypeError, match="Unsupported tensor dtype") as info:
        m["p"].load()
    assert str(f) in str(info.value) and dtype_name in str(info.value)


def test_bf16_to_float16_matches_torch_too(tmp_path: Path, open_model) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    rng = np.random.default_rng(3)
    a = (rng.standard_normal((64, 64)) * 100).astype(ml_dtypes.bfloat16)
    f = st_save({"w": a}, tmp_path / "w.safetensors")
    expected = load_file(str(f))["w"].to(torch.float16).numpy()
    assert same_bits(open_model(f)["w"].load(), expected)
