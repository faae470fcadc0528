"""Every rule of the header, each with its own test: class of the error, file named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import lazyllama
from lazyllama import HeaderError
from lazyllama.format import MAX_HEADER_BYTES, parse_header

from .conftest import st_save


def write_raw(path: Path, header: object, data: bytes = b"", *, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def assert_header_error(path: Path, *needles: str) -> HeaderError:
    with pytest.raises(HeaderError) as info:
        lazyllama.open(path)
    msg = str(info.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return info.value


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_the_prefix(tmp_path: Path, size: int) -> None:
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"\x01" * size)
    assert_header_error(f, "shorter than the 8-byte prefix")


def test_header_length_over_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert_header_error(f, "exceeds")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    f = tmp_path / "past.safetensors"
    f.write_bytes(struct.pack("<Q", 100) + b"{}")
    assert_header_error(f, "past the end")


def test_header_not_utf8(tmp_path: Path) -> None:
    assert_header_error(write_raw(tmp_path / "a.safetensors", None, raw=b'{"\xff": 1}'), "UTF-8")


def test_header_not_json(tmp_path: Path) -> None:
    assert_header_error(write_raw(tmp_path / "a.safetensors", None, raw=b"{nope"), "JSON")


@pytest.mark.parametrize("body", [b"[]", b"3", b'"x"', b"null"])
def test_header_not_an_object(tmp_path: Path, body: bytes) -> None:
    assert_header_error(write_raw(tmp_path / "a.safetensors", None, raw=body), "not an object")


def test_header_deeply_nested(tmp_path: Path) -> None:
    body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_header_error(write_raw(tmp_path / "a.safetensors", None, raw=body), "nested")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_key(tmp_path: Path, missing: str) -> None:
    e = entry("F32", [1], 0, 4)
    del e[missing]
    f = write_raw(tmp_path / "a.safetensors", {"t": e}, b"\0" * 4)
    assert_header_error(f, "'t'", missing)


@pytest.mark.parametrize(
    "bad",
    [
        {"dtype": 3, "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": "0-4"},
        [1, 2],
    ],
)
def test_entry_with_wrong_types(tmp_path: Path, bad: object) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": bad}, b"\0" * 4)
    assert_header_error(f, "'t'")


def test_unknown_dtype(tmp_path: Path) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("F12", [1], 0, 2)}, b"\0" * 2)
    assert_header_error(f, "F12", "Unsupported tensor dtype")


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], ["2"], [None]])
def test_negative_or_non_integer_dims(tmp_path: Path, shape: list) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("U8", shape, 0, 0)})
    assert_header_error(f, "shape")


def test_shape_overflow_is_refused_without_allocating(tmp_path: Path) -> None:
    shape = [2**40, 2**40, 2**40]
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("F32", shape, 0, 4)}, b"\0" * 4)
    assert_header_error(f, "overflows")


def test_offsets_end_before_begin(tmp_path: Path) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("U8", [0], 4, 0)}, b"\0" * 4)
    assert_header_error(f, "end before they begin")


def test_byte_length_not_shape_times_item_size(tmp_path: Path) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("F32", [2], 0, 4)}, b"\0" * 4)
    assert_header_error(f, "hold 4 bytes", "needs 8")


def test_overlapping_tensors(tmp_path: Path) -> None:
    h = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}
    assert_header_error(write_raw(tmp_path / "a.safetensors", h, b"\0" * 8), "overlaps")


def test_hole_between_tensors(tmp_path: Path) -> None:
    h = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    assert_header_error(write_raw(tmp_path / "a.safetensors", h, b"\0" * 12), "hole")


@pytest.mark.parametrize("data", [b"\0" * 3, b"\0" * 5])
def test_data_region_not_matching_file_size(tmp_path: Path, data: bytes) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("F32", [1], 0, 4)}, data)
    assert_header_error(f, "cover 4 bytes")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    e = json.dumps(entry("F32", [1], 0, 4))
    body = f'{{"t": {e}, "t": {e}}}'.encode()
    assert_header_error(write_raw(tmp_path / "a.safetensors", None, b"\0" * 4, raw=body), "'t'")


def test_sub_byte_dtype_must_fill_whole_bytes(tmp_path: Path) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"t": entry("F4", [3], 0, 2)}, b"\0" * 2)
    assert_header_error(f, "whole bytes")


@pytest.mark.parametrize("meta", [{"a": 1}, {"a": None}, ["a"], "x"])
def test_metadata_must_map_str_to_str(tmp_path: Path, meta: object) -> None:
    f = write_raw(tmp_path / "a.safetensors", {"__metadata__": meta})
    assert_header_error(f, "__metadata__")


def test_metadata_is_kept(tmp_path: Path, open_model) -> None:
    f = st_save(
        {"x": np.ones(2, np.float32)}, tmp_path / "m.safetensors", {"format": "pt", "k": "v"}
    )
    assert open_model(f).metadata == {"format": "pt", "k": "v"}


def test_valid_edge_cases_load(tmp_path: Path, open_model) -> None:
    tensors = {
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 7), np.float32),
        "row": np.arange(3, dtype=np.float32),
    }
    m = open_model(st_save(tensors, tmp_path / "e.safetensors"))
    assert m["scalar"].shape == () and m["scalar"].load().shape == ()
    assert float(m["scalar"].load()) == 2.5
    assert m["empty"].load().shape == (0, 7)
    assert m["row"].load().tolist() == [0.0, 1.0, 2.0]


def test_file_with_no_tensors(tmp_path: Path, open_model) -> None:
    m = open_model(write_raw(tmp_path / "none.safetensors", {"__metadata__": {"a": "b"}}))
    assert len(m) == 0 and m.metadata == {"a": "b"}


def test_tensors_come_in_file_order_whatever_the_json_order() -> None:
    body = json.dumps({"b": entry("U8", [2], 2, 4), "a": entry("U8", [2], 0, 2)}).encode()
    h = parse_header(body, "f", 8 + len(body) + 4)
    assert list(h.tensors) == ["a", "b"]
    assert h.tensors["b"].offset == 8 + len(body) + 2
