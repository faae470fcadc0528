"""The overflow policy: values beyond float16's range become infinite when converted, and
``on_overflow`` says whether that warns (the default), raises, or passes silently. Infinities
the file already holds are not overflow."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import lazyllama
from lazyllama.writer import save_file

from ._robust_helpers import quiesce, watchdog
from .conftest import oracle_f16, same_bits, st_save

ROWS = 8


def f32_with(values: dict[int, float]) -> np.ndarray:
    """An (8, 4) float32 tensor of small values, with ``values`` at those flat positions."""
    a = np.linspace(-2, 2, ROWS * 4, dtype=np.float32)
    for i, v in values.items():
        a[i] = v
    return a.reshape(ROWS, 4)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Tensors with a known number of overflowing values each."""
    path = tmp_path / "model.safetensors"
    inf = float("inf")
    st_save(
        {
            "three": f32_with({1: 1e6, 6: -7e4, 30: 3.4e38}),  # 3 overflow, all in rows 0, 1, 7
            "stored_inf": f32_with({0: inf, 5: -inf}),  # infinities already there: 0 overflow
            "inf_and_two": f32_with({0: inf, 9: 1e5, 10: -1e5}),  # 2 overflow, 1 stored
            "nan": f32_with({2: float("nan")}),  # NaN is not overflow
            "edge_ok": f32_with({0: 65504.0, 1: -65504.0, 2: 65519.99}),  # round to ±65504
            "edge_over": f32_with({0: 65520.0}),  # rounds up to inf
            "bf16_ok": f32_with({0: 65280.0, 1: -65280.0}).astype(ml_dtypes.bfloat16),
            "bf16_over": f32_with({0: 65536.0, 3: -65536.0}).astype(ml_dtypes.bfloat16),
            "bf16_inf": f32_with({0: inf}).astype(ml_dtypes.bfloat16),
            "f64_over": np.where(np.arange(ROWS * 4) == 4, 1e300, 0.5).reshape(ROWS, 4),
            "f16": f32_with({0: 65504.0}).astype(np.float16),  # no conversion at all
        },
        path,
    )
    return path


def overflow_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, Warning)]


def load_recording(
    path: Path, name: str, read: str = "load", **kw: object
) -> tuple[np.ndarray, list[str]]:
    with (
        watchdog(60),
        lazyllama.open(path, **kw) as m,  # type: ignore[arg-type]
        warnings.catch_warnings(record=True) as record,
    ):
        warnings.simplefilter("always")
        got = m[name].load() if read == "load" else m[name][ROWS - 2 :]
    return got, overflow_warnings(record)


def test_default_warns_naming_tensor_file_and_count(path: Path) -> None:
    with lazyllama.open(path) as m, pytest.warns(lazyllama.Float16OverflowWarning) as record:
        got = m["three"].load()
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "'three'" in message
    assert "3 values" in message
    assert "F32" in message
    want = oracle_f16(path)["three"]
    assert same_bits(got, want)
    assert np.isposinf(got.reshape(-1)[[1, 30]]).all() and np.isneginf(got.reshape(-1)[6])


def test_warn_counts_only_new_infinities(path: Path) -> None:
    _, messages = load_recording(path, "inf_and_two")
    assert len(messages) == 1 and "2 values" in messages[0] and "'inf_and_two'" in messages[0]


@pytest.mark.parametrize(
    "name", ["stored_inf", "nan", "edge_ok", "bf16_ok", "bf16_inf", "f16"], ids=str
)
@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_no_overflow_means_no_warning_and_no_error(path: Path, name: str, policy: str) -> None:
    got, messages = load_recording(path, name, on_overflow=policy)
    assert messages == []
    assert same_bits(got, oracle_f16(path)[name])


@pytest.mark.parametrize(
    ("name", "count"), [("edge_over", 1), ("bf16_over", 2), ("f64_over", 1), ("three", 3)]
)
def test_each_source_dtype_overflows_where_float16_ends(path: Path, name: str, count: int) -> None:
    got, messages = load_recording(path, name)
    assert len(messages) == 1 and f"{count} values" in messages[0], messages
    assert same_bits(got, oracle_f16(path)[name])


def test_bf16_edges(path: Path) -> None:
    """65504 is float16's largest value; bfloat16 cannot hold it (it rounds to 65536, which
    overflows), and its largest value below is 65280, which converts exactly."""
    assert float(ml_dtypes.bfloat16(65504.0)) == 65536.0
    ok = lazyllama.open(path, on_overflow="raise")
    with ok:
        assert ok["bf16_ok"].load().reshape(-1)[:2].tolist() == [65280.0, -65280.0]
        with pytest.raises(lazyllama.Float16OverflowError, match="2 values"):
            ok["bf16_over"].load()


def test_raise_names_tensor_file_and_count(path: Path) -> None:
    with lazyllama.open(path, on_overflow="raise") as m:
        with pytest.raises(lazyllama.Float16OverflowError) as info:
            m["three"].load()
        message = str(info.value)
        assert str(path) in message and "'three'" in message and "3 values" in message
        assert isinstance(info.value, OverflowError)
        # Not cached as if it had succeeded: asking again raises again.
        with pytest.raises(lazyllama.Float16OverflowError):
            m["three"].load()
        assert m.cache_stats().resident_bytes == 0


def test_raise_gives_back_the_budget_it_held(path: Path) -> None:
    """A budget with room for one copy: each attempt must find it free again (an attempt that
    waited for room would wait for ever, hence the timeout)."""

    async def attempt(m: lazyllama.LazyModel) -> None:
        await asyncio.wait_for(m["three"].aload(), 3)

    with watchdog(60), lazyllama.open(path, on_overflow="raise", cache_bytes=100) as m:
        for _ in range(3):
            with pytest.raises(lazyllama.Float16OverflowError):
                asyncio.run(attempt(m))
        stats = quiesce(m, timeout=1.0)
        assert stats.in_flight_bytes == 0
        # With the budget free again, other tensors still load.
        assert same_bits(m["stored_inf"].load(), oracle_f16(path)["stored_inf"])


def test_rows_are_judged_by_the_rows_read(path: Path) -> None:
    """Reading rows converts only those rows: overflow elsewhere in the tensor is not theirs."""
    with lazyllama.open(path, on_overflow="raise") as m:
        rows = m["three"][2:6]  # rows 2-5 hold no overflowing value
        assert same_bits(rows, oracle_f16(path)["three"][2:6])
        with pytest.raises(lazyllama.Float16OverflowError, match="1 values"):
            m["three"][ROWS - 1]  # row 7 holds one (3.4e38)
    _, messages = load_recording(path, "three", read="rows")
    assert len(messages) == 1 and "1 values" in messages[0]


def test_ignore_neither_warns_nor_raises(path: Path) -> None:
    for name in ("three", "bf16_over", "f64_over", "edge_over"):
        got, messages = load_recording(path, name, on_overflow="ignore")
        assert messages == []
        assert same_bits(got, oracle_f16(path)[name])
        assert np.isinf(got).any()


def test_keeping_the_stored_dtype_never_overflows(path: Path) -> None:
    with lazyllama.open(path, dtype=None, on_overflow="raise") as m:
        assert m["three"].load().dtype == np.float32
        assert m["f64_over"].load().dtype == np.float64


def test_bad_policy_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="on_overflow"):
        lazyllama.open(path, on_overflow="loud")  # type: ignore[arg-type]


def test_overflow_across_chunks_is_counted_once_per_value(tmp_path: Path) -> None:
    """A tensor larger than one read chunk: every chunk's overflow adds up, none twice."""
    n = (8 << 20) // 4 * 2 + 1000  # F32 elements: a bit more than two 8 MiB chunks
    a = np.zeros(n, np.float32)
    where = np.array([0, 1, (8 << 20) // 4 - 1, (8 << 20) // 4, n - 1])
    a[where] = 1e9
    path = tmp_path / "big.safetensors"
    save_file({"big": a}, path)
    got, messages = load_recording(path, "big")
    assert len(messages) == 1 and f"{len(where)} values" in messages[0], messages
    assert np.isinf(got).sum() == len(where)
