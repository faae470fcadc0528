"""Recycled memory: an evicted array's memory is taken by the next read of its size, only when
nothing else refers to it, and always within the budget.

Arrays from 64 KiB up are recycled here (1 MiB in use), so the small fixtures take that path.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import lazyllama
import lazyllama.cache

from ._robust_helpers import Failing
from .conftest import oracle_f16, same_bits, st_save

T = 64 * 512 * 2  # bytes of one tensor as float16


@pytest.fixture(autouse=True)
def _recycle_small_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazyllama.cache, "RECYCLE_BYTES", T)


@pytest.fixture(scope="module")
def ten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten BF16 tensors of 64 KiB each as float16 (t0 … t9), and w0, w1 twice as wide."""
    rng = np.random.default_rng(11)
    tensors = {
        f"t{i}": rng.standard_normal((64, 512), dtype=np.float32).astype(ml_dtypes.bfloat16)
        for i in range(10)
    }
    for i in range(2):
        wide = rng.standard_normal((64, 1024), dtype=np.float32)
        tensors[f"w{i}"] = wide.astype(ml_dtypes.bfloat16)
    return st_save(tensors, tmp_path_factory.mktemp("ten") / "ten.safetensors")


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_evicted_memory_is_taken_by_the_next_read_of_its_size(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=2 * T)
    want = oracle_f16(ten)
    first = address(m["t0"].load())  # dropped at once: only the cache holds it
    m["t1"].load()
    got = m["t2"].load()  # t0, least recently used, is evicted and its memory reused
    assert address(got) == first
    assert same_bits(got, want["t2"])
    stats = m.cache_stats()
    assert (stats.evictions, stats.recycled, stats.spare_bytes) == (1, 1, 0)
    m._eng().cache.check()


def test_an_entry_of_the_size_wanted_goes_before_an_older_one(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=3 * T)
    m["t0"].load()
    wide = address(m["w0"].load())  # 2 T: the budget is full
    got = m["w1"].load()  # t0 is older, but w0's memory is what w1 needs
    assert address(got) == wide
    assert m.cache_stats().recycled == 1
    assert "t0" in m._eng().cache._entries


HOLDERS: dict[str, Callable[[np.ndarray], Any]] = {
    "the array": lambda a: a,
    "a slice": lambda a: a[5:9],
    "a transpose": lambda a: a.T,
    "a reshaped view": lambda a: a.reshape(-1),
    "a memoryview": memoryview,
    "np.asarray": np.asarray,
    "a dict": lambda a: {"w": a},
}


@pytest.mark.parametrize("hold", sorted(HOLDERS))
def test_memory_a_caller_still_holds_is_never_reused(ten: Path, open_model, hold: str) -> None:
    m = open_model(ten, cache_bytes=2 * T)
    want = oracle_f16(ten)
    t0 = m["t0"].load()
    kept = HOLDERS[hold](t0)
    where, expected = address(t0), np.array(np.asarray(t0), copy=True)
    del t0
    for i in range(1, 10):  # every one of them evicts something; t0 goes first
        got = m[f"t{i}"].load()
        assert address(got) != where
        assert same_bits(got, want[f"t{i}"])
    assert m.cache_stats().evictions >= 8

    def unwrap(x: Any) -> np.ndarray:
        return np.asarray(x["w"] if hold == "a dict" else x)

    assert same_bits(unwrap(kept), unwrap(HOLDERS[hold](expected)))
    assert m.cache_stats().recycled > 0  # the others' memory was recycled meanwhile


def test_a_row_read_of_a_cached_tensor_keeps_its_memory(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=2 * T)
    want = oracle_f16(ten)
    m["t0"].load()
    row = m["t0"][3]  # a view of the cached array
    for i in range(1, 10):
        m[f"t{i}"].load()
    assert same_bits(row, want["t0"][3])


def test_memory_of_another_size_is_let_go_within_the_budget(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=3 * T)
    for n in ("t0", "t1", "t2"):
        m[n].load()
    m["w0"].load()  # 2 T: t0 and t1 are evicted, and their memory, of no use to w0, let go
    stats = m.cache_stats()
    assert (stats.evictions, stats.recycled, stats.spare_bytes) == (2, 0, 0)
    assert stats.resident_bytes == 3 * T and stats.peak_resident_bytes <= 3 * T
    m["w1"].load()  # w0 is evicted, t2 kept: w1 lands in w0's memory
    stats = m.cache_stats()
    assert (stats.evictions, stats.recycled, stats.spare_bytes) == (3, 1, 0)
    assert sorted(m._eng().cache._entries) == ["t2", "w1"]
    m._eng().cache.check()


def test_clear_cache_lets_spare_memory_go(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=4 * T)
    m["t0"].load()
    m["t1"].load()
    m["t2"].load()
    m["t3"].load()
    cache = m._eng().cache
    cache._evict_one("t0")  # as making room would, but with no read to take the memory
    assert m.cache_stats().spare_bytes == T
    m.clear_cache()
    assert m.cache_stats().spare_bytes == 0
    cache.check()


@pytest.mark.parametrize("when", ["reading", "before-allocating"])
def test_a_failed_read_leaves_no_promised_memory(
    ten: Path, open_model, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """t0's memory is promised to t2's read, which fails once: while reading, after it took
    the memory, or before it allocated anything. No promise outlives it, the books balance,
    and the next request reads the right bytes."""
    m = open_model(ten, cache_bytes=2 * T)
    m["t0"].load()
    m["t1"].load()
    if when == "reading":
        failing = Failing(monkeypatch, os, "preadv", sync=True)
    else:
        failing = Failing(monkeypatch, m, "_read_whole")
        failing.error = lazyllama.ReadError(f"{ten}: refused before anything was allocated")
    failing.times = 1
    with pytest.raises(lazyllama.ReadError) as info:
        m["t2"].load()
    assert str(ten) in str(info.value)
    cache = m._eng().cache
    assert not any(cache._pinned.values())
    cache.check()
    assert same_bits(m["t2"].load(), oracle_f16(ten)["t2"])
    cache.check()


def test_a_random_workload_never_touches_what_callers_hold(ten: Path, open_model) -> None:
    """Blocking loads and concurrent async ones, arrays and views kept and dropped at random:
    every kept one still holds its bytes at the end, the books balance after every step, and
    memory was recycled along the way."""
    budget = 4 * T + T // 2
    m = open_model(ten, cache_bytes=budget)
    want = oracle_f16(ten)
    names = [f"t{i}" for i in range(10)] + ["w0", "w1"]
    rng = random.Random(5)
    kept: list[tuple[str, Any, np.ndarray]] = []

    async def batch(chosen: list[str]) -> list[np.ndarray]:
        return await asyncio.gather(*(m[n].aload() for n in chosen))

    for _ in range(120):
        chosen = rng.sample(names, rng.randrange(1, 4))
        threaded = rng.random() < 0.5
        got = [m[n].load() for n in chosen] if threaded else asyncio.run(batch(chosen))
        for name, a in zip(chosen, got, strict=True):
            assert same_bits(a, want[name])
            if rng.random() < 0.2:
                view = a[rng.randrange(64) :] if rng.random() < 0.5 else a
                kept.append((name, view, np.array(view, copy=True)))
        if kept and rng.random() < 0.3:
            kept.pop(rng.randrange(len(kept)))
        del got
        m._eng().cache.check()
        stats = m.cache_stats()
        assert stats.resident_bytes + stats.in_flight_bytes + stats.spare_bytes <= budget
    for _, view, copy in kept:
        assert same_bits(view, copy)
    assert m.cache_stats().recycled > 10
