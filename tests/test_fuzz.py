"""Fuzzing the header parser and whole files.

Every input either parses (and opens) and reads back the bytes an independent reader sees, or
raises a ``LazyLlamaError`` naming the file: never another exception, a hang, or an allocation
out of proportion to the input. Inputs are random bytes and valid files put through mutations of
lengths, offsets, shapes, dtypes, JSON types, truncation, duplicate keys, huge numbers, deep
nesting and non-ASCII names.

The examples are derandomized, so a run is repeatable. ``LAZYLLAMA_FUZZ_EXAMPLES=N`` spreads about
N examples over the tests instead of the default ~2,000, and ``LAZYLLAMA_FUZZ_RANDOM=1`` draws
fresh examples (``bench/fuzz.py`` sets both).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lazyllama
from lazyllama.format import MAX_HEADER_BYTES, Header, header_length, parse_header

from ._robust_helpers import (
    FLOAT_DTYPES,
    ST_DTYPES,
    as_float16,
    decode,
    same,
    st_deserialize,
    watchdog,
    write_raw,
)

FILE = "/fuzz/model.safetensors"

# -- how many examples ----------------------------------------------------------------------

_DEFAULTS = {"header_length": 300, "random_bytes": 600, "mutated_header": 1000, "whole_file": 250}
_WANTED = int(os.environ.get("LAZYLLAMA_FUZZ_EXAMPLES", "0") or 0)
_SCALE = max(1.0, _WANTED / sum(_DEFAULTS.values()))


def fuzz_settings(kind: str) -> settings:
    return settings(
        max_examples=math.ceil(_DEFAULTS[kind] * _SCALE),
        derandomize=not os.environ.get("LAZYLLAMA_FUZZ_RANDOM"),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# -- valid files, then mutated --------------------------------------------------------------

# Names stay valid UTF-8 (no lone surrogates): non-ASCII, control and JSON-special characters
# included; the empty name too.
NAMES = st.text(st.characters(codec="utf-8"), max_size=8).filter(lambda s: s != "__metadata__")
# Float dtypes drawn more often: they are the ones read back as float16.
DTYPE_CHOICES = sorted(ST_DTYPES) + ["BF16", "F16", "F32"] * 3
HUGE = [2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, 10**30]
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.sampled_from([*HUGE, -1, -(2**63), 0, 1]),
    st.floats(allow_nan=False),
    st.text(max_size=6),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)

# Raw JSON text spliced in where a value goes: what json.dumps never writes.
RAW_VALUES = st.one_of(
    st.sampled_from(
        [
            "1" * 5000,  # beyond Python's int-from-string digit limit
            "1" * 30,
            "18446744073709551616",
            "18446744073709551615",
            "-0",
            "1.0",
            "1e400",
            "-1e400",
            "NaN",
            "Infinity",
            "-Infinity",
            "0x10",
            "01",
            "1e2",
            '"\\ud800"',
            '"\\u0000"',
            "[1,]",
            "",
        ]
    ),
    st.integers(1, 5000).map(lambda d: "[" * d + "]" * d),
    st.integers(1, 5000).map(lambda d: '{"a":' * d + "1" + "}" * d),
)


@dataclass
class Raw:
    """A JSON value written as the given text."""

    text: str


@dataclass
class Dup:
    """A JSON object written as these pairs, keys repeated as they come."""

    pairs: list[tuple[str, Any]]


def dump(value: Any, ensure_ascii: bool) -> str:
    """JSON text of ``value``; ``Raw`` and ``Dup`` let it hold what json.dumps would not."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Dup):
        items = value.pairs
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        return "[" + ",".join(dump(v, ensure_ascii) for v in value) + "]"
    else:
        return json.dumps(value, ensure_ascii=ensure_ascii)
    return (
        "{"
        + ",".join(
            json.dumps(k, ensure_ascii=ensure_ascii) + ":" + dump(v, ensure_ascii) for k, v in items
        )
        + "}"
    )


@dataclass
class Spec:
    """A file being built: header object, tensors' bytes in file order, how it is written."""

    header: Any
    data: bytes
    ensure_ascii: bool
    pad: int

    def blob(self) -> bytes:
        raw = dump(self.header, self.ensure_ascii).encode("utf-8", "surrogatepass")
        raw += b" " * self.pad
        return len(raw).to_bytes(8, "little") + raw + self.data


# Shapes the format allows: small ones mostly, and now and then many unit dimensions or a
# dimension beyond 2**62 beside a zero (no elements either way).
SHAPES = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(st.integers(0, 4), max_size=3),
    st.integers(60, 70).map(lambda n: [1] * n),
    st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64 - 1]).map(lambda d: [0, d]),
)


@st.composite
def valid_specs(draw: st.DrawFn) -> Spec:
    names = draw(st.lists(NAMES, max_size=5, unique=True))
    entries: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_CHOICES))
        shape = draw(SHAPES)
        bits = ST_DTYPES[dtype][0] * math.prod(shape)
        while bits % 8:  # sub-byte dtypes: whole bytes only
            shape.append(2)
            bits *= 2
        blobs[name] = draw(st.binary(min_size=bits // 8, max_size=bits // 8))
        entries[name] = {"dtype": dtype, "shape": shape}
    order = draw(st.permutations(names))  # file order need not be the JSON's order
    offset = 0
    for name in order:
        entries[name]["data_offsets"] = [offset, offset + len(blobs[name])]
        offset += len(blobs[name])
    header: dict[str, Any] = {}
    meta = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    meta_first = draw(st.booleans())
    if meta is not None and meta_first:
        header["__metadata__"] = meta
    for name in names:
        entry = entries[name]
        keys = draw(st.permutations(list(entry)))
        header[name] = {k: entry[k] for k in keys}
    if meta is not None and not meta_first:
        header["__metadata__"] = meta
    return Spec(
        header,
        b"".join(blobs[n] for n in order),
        draw(st.booleans()),
        draw(st.sampled_from([0, 0, 1, 7, 64])),
    )


def _tensor_names(spec: Spec) -> list[str]:
    if not isinstance(spec.header, dict):
        return []
    return [k for k, v in spec.header.items() if k != "__metadata__" and isinstance(v, dict)]


def _mutate(draw: st.DrawFn, spec: Spec) -> None:
    """Apply one mutation to the header object or the file's layout."""
    names = _tensor_names(spec)
    kinds = ["meta", "top", "dup_top", "raw_top", "append", "cut_data", "ascii"]
    if names:
        kinds += ["dtype", "shape", "reshape", "offsets", "shift", "drop", "extra", "entry"]
        kinds += ["dup_entry", "raw_entry", "dtype", "shape", "reshape", "offsets", "shift"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("top", "dup_top", "raw_top", "meta") or not names:
        if kind == "top":
            spec.header = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        elif kind == "dup_top" and isinstance(spec.header, dict) and spec.header:
            pairs = list(spec.header.items())
            pairs.insert(draw(st.integers(0, len(pairs))), draw(st.sampled_from(pairs)))
            spec.header = Dup(pairs)
        elif kind == "raw_top" and isinstance(spec.header, dict):
            spec.header[draw(NAMES)] = Raw(draw(RAW_VALUES))
        elif kind == "meta" and isinstance(spec.header, dict):
            spec.header["__metadata__"] = draw(
                JSON_VALUES | st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=2)
            )
        elif kind == "append":
            spec.data += draw(st.binary(min_size=1, max_size=9))
        elif kind == "cut_data" and spec.data:
            spec.data = spec.data[: draw(st.integers(0, len(spec.data) - 1))]
        elif kind == "ascii":
            spec.ensure_ascii = not spec.ensure_ascii
        return
    name = draw(st.sampled_from(names))
    entry: dict[str, Any] = spec.header[name]
    if kind == "dtype":
        entry["dtype"] = draw(
            st.sampled_from(sorted(ST_DTYPES))
            | st.sampled_from(["f16", "F8", "BF16 ", "float16", "", "U128", "F8_E4M3FN"])
            | JSON_SCALARS
        )
    elif kind == "shape":
        entry["shape"] = draw(
            st.lists(st.integers(-3, 6) | st.sampled_from(HUGE), max_size=5)
            | st.lists(st.integers(0, 2), min_size=60, max_size=80)
            | st.lists(JSON_SCALARS, max_size=3)
            | JSON_VALUES
        )
    elif kind == "reshape" and isinstance(entry.get("shape"), list):
        # Same element count, odd form: many unit dimensions, or a huge dimension beside a 0.
        shape = list(entry["shape"])
        if 0 in shape and draw(st.booleans()):
            shape.insert(draw(st.integers(0, len(shape))), draw(st.sampled_from(HUGE)))
        else:
            for _ in range(draw(st.sampled_from([1, 3, 61, 62, 63, 64, 65, 80]))):
                shape.insert(draw(st.integers(0, len(shape))), 1)
        entry["shape"] = shape
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.lists(st.integers(-2, 40) | st.sampled_from(HUGE), max_size=3) | JSON_VALUES
        )
    elif kind == "shift" and isinstance(entry.get("data_offsets"), list):
        delta = draw(st.sampled_from([-1, 1, -8, 8, 2**64, -(2**64)]))
        which = draw(st.sampled_from([(0,), (1,), (0, 1)]))
        offsets = list(entry["data_offsets"])
        for i in which:
            if i < len(offsets) and isinstance(offsets[i], int):
                offsets[i] += delta
        entry["data_offsets"] = offsets
    elif kind == "drop" and entry:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif kind == "extra":
        entry[draw(st.text(max_size=5))] = draw(JSON_VALUES)
    elif kind == "entry":
        spec.header[name] = draw(JSON_VALUES)
    elif kind == "dup_entry":
        pairs = list(entry.items())
        if pairs:
            key, _ = draw(st.sampled_from(pairs))
            pairs.append((key, draw(JSON_VALUES)))
        spec.header[name] = Dup(pairs)
    elif kind == "raw_entry":
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        where = draw(st.sampled_from(["value", "in_list"]))
        value = Raw(draw(RAW_VALUES))
        entry[key] = [0, value] if where == "in_list" else value


def _mutate_bytes(draw: st.DrawFn, blob: bytes) -> bytes:
    """Apply one mutation to the file's bytes: length prefix, truncation, stray bytes."""
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
    kind = draw(st.sampled_from(["prefix", "prefix_near", "truncate", "flip", "insert", "utf8"]))
    if kind == "prefix":
        value = draw(st.integers(0, 2**64 - 1) | st.sampled_from([MAX_HEADER_BYTES + 1, 0, 2]))
        return value.to_bytes(8, "little") + blob[8:]
    if kind == "prefix_near":
        value = max(0, n + draw(st.integers(-9, 9)))
        return value.to_bytes(8, "little") + blob[8:]
    if kind == "truncate":
        return blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    header_end = min(len(blob), 8 + n)
    if header_end <= 8:
        return blob
    at = draw(st.integers(8, header_end - 1))
    if kind == "flip":
        return blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]
    stray = draw(st.binary(min_size=1, max_size=4)) if kind == "insert" else b"\xff"
    if kind == "utf8":
        stray = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\xc0\xaf"]))
    new = blob[:at] + stray + blob[at:header_end] + blob[header_end:]
    return (n + len(stray)).to_bytes(8, "little") + new[8:]


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Bytes of a file, and whether they are still the valid file drawn before mutation."""
    spec = draw(valid_specs())
    rounds = draw(st.integers(0, 3))
    for _ in range(rounds):
        _mutate(draw, spec)
    blob = spec.blob()
    byte_rounds = draw(st.sampled_from([0, 0, 0, 1]))
    for _ in range(byte_rounds):
        blob = _mutate_bytes(draw, blob)
    return blob, rounds == 0 and byte_rounds == 0


# -- the properties -------------------------------------------------------------------------


def parse_bytes(blob: bytes, file_size: int | None = None) -> Header:
    """lazyllama's parse of a whole file's bytes, as ``open()`` does it."""
    size = len(blob) if file_size is None else file_size
    n = header_length(blob[:8], FILE, size)
    raw = blob[8 : 8 + n]
    if len(raw) != n:
        raise lazyllama.HeaderError(f"{FILE}: file ended inside its header")
    return parse_header(raw, FILE, size)


def numpy_can_hold(shape: tuple[int, ...], itemsize: int = 8) -> bool:
    """Whether numpy can make an array of this shape: at most 64 dimensions, and the bytes the
    non-zero dimensions span within its index type (even when another dimension is 0)."""
    return len(shape) <= 64 and math.prod(d for d in shape if d) * itemsize < 2**63


def check_header(header: Header, blob: bytes) -> None:
    """What a parsed header promises: entries that tile the data region exactly."""
    assert header.file == FILE
    assert header.file_size == len(blob)
    pos = header.data_start
    for name, info in header.tensors.items():
        assert info.name == name and info.file == FILE
        width = ST_DTYPES[info.dtype][0]
        assert info.nbytes * 8 == width * math.prod(info.shape)
        assert info.offset == pos, "tensors are in file order, tiling the data"
        pos += info.nbytes
    assert pos == len(blob)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def compare_with_safetensors(header: Header, blob: bytes) -> None:
    """Where the safetensors package accepts the same bytes, it must see the same tensors."""
    theirs = st_deserialize(blob)
    if theirs is None:
        return
    assert set(theirs) == set(header.tensors)
    for name, (dtype, shape, data) in theirs.items():
        info = header.tensors[name]
        assert (info.dtype, info.shape) == (dtype, shape), name
        assert blob[info.offset : info.offset + info.nbytes] == data, name


def parse_within_memory(blob: bytes, file_size: int | None = None) -> Header | None:
    """Parse ``blob``; assert the peak allocation is bounded by the bytes actually given (not
    by any length, shape or offset they claim). None when it is rejected with HeaderError."""
    tracemalloc.start()
    try:
        return parse_bytes(blob, file_size)
    except lazyllama.HeaderError as e:
        assert FILE in str(e)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Python objects for the JSON cost tens of bytes per byte of text, never more.
        assert peak <= 64 * len(blob) + (256 << 10), (peak, len(blob))


@fuzz_settings("header_length")
@given(st.binary(max_size=12), st.integers(0, 2**65) | st.sampled_from([0, 7, 8, 9, 2**64]))
def test_header_length_accepts_only_what_fits(first8: bytes, file_size: int) -> None:
    try:
        n = header_length(first8, FILE, file_size)
    except lazyllama.HeaderError as e:
        assert FILE in str(e)
        value = int.from_bytes(first8[:8], "little")
        assert len(first8) < 8 or file_size < 8 or value > MAX_HEADER_BYTES or value + 8 > file_size
    else:
        assert len(first8) >= 8
        assert n == int.from_bytes(first8[:8], "little")
        assert n <= MAX_HEADER_BYTES and 8 + n <= file_size


@fuzz_settings("random_bytes")
@given(
    st.binary(max_size=200)
    | st.binary(max_size=120).map(lambda b: len(b).to_bytes(8, "little") + b)
    | st.text(max_size=80)
    .map(lambda s: s.encode("utf-8", "surrogatepass"))
    .map(lambda b: len(b).to_bytes(8, "little") + b)
)
def test_random_bytes_parse_or_header_error(blob: bytes) -> None:
    header = parse_within_memory(blob)
    if header is not None:
        check_header(header, blob)
        compare_with_safetensors(header, blob)


@fuzz_settings("mutated_header")
@given(mutated_files(), st.sampled_from([None, None, None, None, 1, 2**64, -1]))
def test_mutated_headers_parse_or_header_error(
    case: tuple[bytes, bool], size_delta: int | None
) -> None:
    blob, untouched = case
    if size_delta is not None:  # a file size other than the bytes': the header must fit it
        size = max(0, len(blob) + size_delta)
        header = parse_within_memory(blob, size)
        if header is not None:
            assert header.data_start + sum(i.nbytes for i in header.tensors.values()) == size
        return
    header = parse_within_memory(blob)
    if untouched:
        theirs = st_deserialize(blob)
        assert theirs is not None, "the generator writes valid files"
        # A valid file must parse, unless a shape is beyond what numpy can hold: refusing
        # those when opening is as good as refusing them when reading.
        if all(numpy_can_hold(shape) for _, shape, _ in theirs.values()):
            assert header is not None, "a valid file must parse"
    if header is not None:
        check_header(header, blob)
        compare_with_safetensors(header, blob)


# -- whole files through lazyllama.open -----------------------------------------------------


def expected_arrays(blob: bytes, header: Header, dtype: str | None) -> dict[str, Any]:
    """Each tensor as it should be read back: from the safetensors package's bytes when it
    accepts the file, else from the file's bytes at the place the header gives. A value that
    cannot be read as asked is None."""
    theirs = st_deserialize(blob)
    out: dict[str, Any] = {}
    for name, info in header.tensors.items():
        if theirs is not None:
            st_dtype, shape, data = theirs[name]
        else:
            st_dtype, shape = info.dtype, info.shape
            data = blob[info.offset : info.offset + info.nbytes]
        np_type = ST_DTYPES[st_dtype][1]
        if np_type is None or (dtype == "float16" and st_dtype not in FLOAT_DTYPES):
            out[name] = None  # packed sub-byte types; integers asked for as float16
            continue
        out_dtype = np.dtype(np.float16 if dtype == "float16" else np_type)
        if not numpy_can_hold(shape, out_dtype.itemsize):
            out[name] = None
        elif math.prod(shape) == 0:
            out[name] = np.empty(shape, out_dtype)
        else:
            arr = decode(data, st_dtype, shape)
            out[name] = as_float16(arr) if dtype == "float16" else arr
    return out


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_counter = itertools.count()


@fuzz_settings("whole_file")
@given(
    st.one_of(mutated_files(), mutated_files(), mutated_files(), st.binary(max_size=64)),
    st.sampled_from(["float16", None]),
    st.sampled_from([None, 0, 64, "1MiB"]),
    st.integers(0, 3),
)
def test_whole_files_open_and_read_back_or_raise(
    fuzz_dir: Path,
    case: tuple[bytes, bool] | bytes,
    dtype: str | None,
    cache_bytes: int | str | None,
    rows: int,
) -> None:
    blob = case[0] if isinstance(case, tuple) else case
    path = fuzz_dir / f"f{next(_counter)}.safetensors"
    path.write_bytes(blob)
    with watchdog(60):
        try:
            model = lazyllama.open(path, dtype=dtype, cache_bytes=cache_bytes, on_overflow="ignore")
        except lazyllama.LazyLlamaError as e:
            assert str(path) in str(e)
            return
        try:
            header = parse_bytes(blob)  # lazyllama accepted it: so must the parser alone
            expected = expected_arrays(blob, header, dtype)
            assert list(model) == list(header.tensors)
            for name, want in expected.items():
                _read_back(model[name], want, rows, str(path))
        finally:
            model.close()


def _read_back(t: lazyllama.LazyTensor, want: np.ndarray | None, rows: int, path: str) -> None:
    """Read ``t`` whole, by rows and by its last row; each read gives ``want`` (indexed
    alike), or, where ``want`` is None (a dtype or shape that cannot be read as asked), a
    LazyLlamaError naming the file and the tensor."""
    reads: list[tuple[Callable[[], np.ndarray], Any]] = [(t.load, ...)]
    if t.ndim:
        reads.append((lambda: t[rows : rows + 2], slice(rows, rows + 2)))
        reads.append((lambda: t[-1], -1))
    for read, index in reads:
        try:
            got = read()
        except IndexError:
            assert index == -1 and t.shape[0] == 0
            continue
        except lazyllama.LazyLlamaError as e:
            assert path in str(e) and repr(t.name) in str(e), str(e)
            assert want is None, f"{t.name!r} should read as {want!r}, not raise {e!r}"
            continue
        assert want is not None, f"{t.name!r} read as {got!r}, expected an error"
        expect = want[index]
        assert same(np.asarray(got), np.asarray(expect)), (t.name, index, got, expect)


# -- targeted cases that fuzzing meets rarely -----------------------------------------------


def test_huge_claims_allocate_nothing_of_their_size() -> None:
    entry = {"dtype": "F16", "shape": [2**31, 2**31], "data_offsets": [0, 2**63]}
    raw = json.dumps({"t": entry}).encode()
    for blob, size in [
        ((MAX_HEADER_BYTES).to_bytes(8, "little") + raw, None),  # length beyond the file
        ((2**64 - 1).to_bytes(8, "little") + raw, None),
        (len(raw).to_bytes(8, "little") + raw, None),  # a tensor bigger than the file
        (len(raw).to_bytes(8, "little") + raw, 2**63),  # a file claimed that large
    ]:
        assert parse_within_memory(blob, size) is None


def test_deep_nesting_is_a_header_error() -> None:
    for depth in (10_000, 1_000_000):
        raw = ("[" * depth + "]" * depth).encode()
        assert parse_within_memory(len(raw).to_bytes(8, "little") + raw) is None
        raw = ('{"a":' * depth + "1" + "}" * depth).encode()
        assert parse_within_memory(len(raw).to_bytes(8, "little") + raw) is None


@pytest.mark.parametrize("meta", [False, 0, "", [], 1, "x", [["a", "b"]]])
def test_metadata_that_is_not_an_object_is_refused(meta: object) -> None:
    raw = json.dumps({"__metadata__": meta}).encode()
    blob = len(raw).to_bytes(8, "little") + raw
    assert st_deserialize(blob) is None  # the format's own reader refuses it
    with pytest.raises(lazyllama.HeaderError, match="__metadata__"):
        parse_bytes(blob)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("U8", [1] * 65),
        ("F16", [1] * 100),
        ("U8", [0, 2**63]),
        ("U8", [0, 2**64 - 1]),
        ("U8", [2**63, 0]),
        ("F32", [0, 2**62]),
        ("BF16", [2**62, 0, 3]),
    ],
    ids=["65-dims", "100-dims", "0x2^63", "0x2^64-1", "2^63x0", "F32-0x2^62", "BF16-2^62x0x3"],
)
def test_shapes_numpy_cannot_hold_raise_a_lazyllama_error(
    tmp_path: Path, dtype: str, shape: list[int]
) -> None:
    """The format allows them (safetensors reads them); numpy arrays cannot have them. Either
    opening or reading must say so with a LazyLlamaError, not numpy's ValueError."""
    nbytes = math.prod(shape) * ST_DTYPES[dtype][0] // 8
    header = {"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    path = write_raw(tmp_path / "model.safetensors", header, bytes(nbytes))
    for out in (None, "float16"):
        try:
            with lazyllama.open(path, dtype=out) as model:
                for read in (model["t"].load, lambda m=model: m["t"][0:1]):
                    with pytest.raises(lazyllama.LazyLlamaError) as e:
                        read()
                    assert str(path) in str(e.value)
        except lazyllama.LazyLlamaError as e:
            assert str(path) in str(e)


def test_a_valid_copy_of_each_spec_round_trips_through_both_writers(tmp_path: Path) -> None:
    """The generator's valid files are what both writers produce, so the fuzz starts from
    files the format's own reader accepts."""
    from safetensors.numpy import save_file as st_save

    from lazyllama.writer import save_file

    arrays = {"é/ü": np.arange(6, dtype=np.float32).reshape(2, 3), "": np.ones(2, np.int8)}
    for writer in (save_file, st_save):
        path = tmp_path / f"{writer.__module__}.safetensors"
        writer(arrays, path, {"k": "v"})
        blob = path.read_bytes()
        header = parse_bytes(blob)
        check_header(header, blob)
        compare_with_safetensors(header, blob)
        assert header.metadata == {"k": "v"}
