"""The engine: byte-bounded LRU with single flight, bulk loads and their bar, layer streaming."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import pytest

import lazyllama
from lazyllama import model as model_module
from lazyllama.io import Range, plan
from lazyllama.writer import save_checkpoint

from .conftest import llama_tensors, oracle_f16, same_bits, small_config, st_save


@pytest.fixture(scope="module")
def ten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten BF16 tensors of 64 KiB each as float16 (t0 … t9)."""
    rng = np.random.default_rng(7)
    tensors = {
        f"t{i}": rng.standard_normal((64, 512), dtype=np.float32).astype(ml_dtypes.bfloat16)
        for i in range(10)
    }
    return st_save(tensors, tmp_path_factory.mktemp("ten") / "ten.safetensors")


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = small_config(num_hidden_layers=6)
    d = tmp_path_factory.mktemp("layered")
    tensors = llama_tensors(cfg)
    save_checkpoint(tensors, d, cfg, max_shard_bytes=sum(a.nbytes for a in tensors.values()) // 3)
    return d


T = 64 * 512 * 2  # bytes of one of the ten tensors as float16


def count_reads(model: lazyllama.LazyModel, delay: float = 0.0) -> dict[str, int]:
    """Count, per tensor, the reads the model makes (and slow them down if asked)."""
    counts: dict[str, int] = {}
    real = model._read_whole

    async def counting(names: list[str]) -> dict[str, np.ndarray]:
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        stats = model.cache_stats()
        assert stats.resident_bytes + stats.in_flight_bytes <= (stats.budget_bytes or 1 << 62)
        if delay:
            await asyncio.sleep(delay)
        return await real(names)

    model._read_whole = counting  # type: ignore[method-assign]
    return counts


async def test_single_flight(ten: Path) -> None:
    m = await lazyllama.aopen(ten, cache_bytes="1MiB")
    try:
        counts = count_reads(m, delay=0.05)
        arrays = await asyncio.gather(*(m["t3"].aload() for _ in range(20)))
        assert counts == {"t3": 1}
        assert all(a is arrays[0] for a in arrays)
        s = m.cache_stats()
        assert (s.misses, s.hits) == (1, 0)  # 19 callers joined the read in flight
    finally:
        await m.aclose()


def test_single_flight_without_a_cache(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=0)
    counts = count_reads(m, delay=0.05)

    async def many() -> list[np.ndarray]:
        return await asyncio.gather(*(m["t1"].aload() for _ in range(8)))

    assert len(asyncio.run(many())) == 8
    assert counts == {"t1": 1}
    m["t1"].load()
    assert counts == {"t1": 2}  # nothing was kept
    assert m.cache_stats().resident_bytes == 0


def test_least_recently_used_is_evicted_first(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=3 * T)
    counts = count_reads(m)
    for n in ("t0", "t1", "t2"):
        m[n].load()
    m["t0"].load()  # t1 is now the least recently used
    m["t3"].load()
    assert m.cache_stats().evictions == 1
    m["t0"].load()
    m["t2"].load()
    assert counts == {"t0": 1, "t1": 1, "t2": 1, "t3": 1}  # t0, t2 still cached
    m["t1"].load()
    assert counts["t1"] == 2


def test_budget_holds_through_a_random_workload(ten: Path, open_model) -> None:
    budget = 4 * T + T // 2
    m = open_model(ten, cache_bytes=budget)
    count_reads(m, delay=0.001)  # the reader checks the books on every read, in flight included
    rng = random.Random(3)
    expected = oracle_f16(ten)

    async def step(names: list[str]) -> list[np.ndarray]:
        return await asyncio.gather(*(m[n].aload() for n in names))

    for _ in range(40):
        names = [f"t{rng.randrange(10)}" for _ in range(rng.randrange(1, 6))]
        for name, got in zip(names, asyncio.run(step(names)), strict=True):
            assert same_bits(got, expected[name])
        s = m.cache_stats()
        assert s.resident_bytes + s.in_flight_bytes <= budget
        assert s.in_flight_bytes == 0
        m._eng().cache.check()
    s = m.cache_stats()
    assert s.evictions > 0 and s.peak_resident_bytes <= budget


def test_oversize_tensor_is_returned_uncached(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=T // 2)
    a = m["t5"].load()
    assert same_bits(a, oracle_f16(ten)["t5"])
    s = m.cache_stats()
    assert s.uncached_oversize == 1 and s.resident_bytes == 0
    assert a.flags.writeable  # not shared with a cache


def test_clear_cache(ten: Path, open_model) -> None:
    m = open_model(ten)
    m.load(["t0", "t1"])
    assert m.cache_stats().resident_bytes == 2 * T
    m.clear_cache()
    assert m.cache_stats().resident_bytes == 0


def test_prefetch_warms_within_the_budget(ten: Path, open_model) -> None:
    m = open_model(ten, cache_bytes=3 * T)
    counts = count_reads(m)
    m.prefetch()
    assert m.cache_stats().resident_bytes == 3 * T
    assert counts == {"t0": 1, "t1": 1, "t2": 1} or set(counts) <= set(m)
    before = dict(counts)
    m.load(list(counts))
    assert counts == before  # all hits


def test_bulk_load_and_iter_load_under_a_small_budget(layered: Path, open_model) -> None:
    expected = oracle_f16(layered)
    m = open_model(layered, cache_bytes=20_000)
    got = m.load()
    assert set(got) == set(expected)
    assert all(same_bits(got[n], expected[n]) for n in expected)
    seen = [name for name, a in m.iter_load() if same_bits(a, expected[name])]
    assert seen == list(m.tensors)  # every tensor, in file order, each right
    assert m.cache_stats().peak_resident_bytes <= 20_000 or m.cache_stats().uncached_oversize


class RecordingBar:
    """Stands in for tqdm: records what a bar was asked to show."""

    bars: ClassVar[list[RecordingBar]] = []

    def __init__(self, *, total: int, disable: bool, unit: str, unit_scale: bool, **_: Any) -> None:
        self.total, self.disable, self.unit, self.unit_scale, self.n = (
            total,
            disable,
            unit,
            unit_scale,
            0,
        )
        RecordingBar.bars.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("method", ["load", "iter_load"])
def test_progress_bar_counts_the_bytes_loaded(
    layered: Path, open_model, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    monkeypatch.setattr(model_module, "tqdm", RecordingBar)
    monkeypatch.delenv("LAZYLLAMA_DISABLE_PROGRESS_BARS")
    RecordingBar.bars.clear()
    m = open_model(layered)
    loaded = getattr(m, method)(progress=True)
    total = sum(a.nbytes for a in dict(loaded).values())
    (bar,) = RecordingBar.bars
    assert (bar.total, bar.n, bar.unit, bar.unit_scale, bar.disable) == (
        total,
        total,
        "B",
        True,
        False,
    )
    monkeypatch.setenv("LAZYLLAMA_DISABLE_PROGRESS_BARS", "1")
    dict(getattr(m, method)(progress=True))
    assert RecordingBar.bars[-1].disable
    monkeypatch.delenv("LAZYLLAMA_DISABLE_PROGRESS_BARS")
    dict(getattr(m, method)(progress=False))
    assert RecordingBar.bars[-1].disable


# -- layer streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_layers_in_order_equal_the_oracle(layered: Path, open_model, prefetch: int) -> None:
    expected = oracle_f16(layered)
    m = open_model(layered, cache_bytes="1MiB")
    seen = []
    for i, layer in m.layers(prefetch=prefetch):
        seen.append(i)
        assert len(layer) == 9
        for short, arr in layer.items():
            assert same_bits(arr, expected[f"model.layers.{i}.{short}"])
    assert seen == list(range(6))


def test_a_layer_split_across_shards_is_read_from_both(layered: Path, open_model) -> None:
    m = open_model(layered)
    split = [
        i for i in range(6) if len({m.tensors[n].file for n in m.layer_names(i).values()}) == 2
    ]
    assert split
    layers = dict(m.layers())
    assert set(layers[split[0]]) == set(m.layer_names(split[0]))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_never_more_than_prefetch_plus_one_layers(layered: Path, open_model, prefetch: int) -> None:
    m = open_model(layered, cache_bytes=0)
    started = 0
    real = m._get

    async def counting_get(names, on_ready=None):  # type: ignore[no-untyped-def]
        nonlocal started
        started += 1
        return await real(names, on_ready)

    m._get = counting_get  # type: ignore[method-assign]
    most = 0
    for i, _layer in m.layers(prefetch=prefetch):
        most = max(most, started - i)  # layers before i are released: i is held, the rest fly
    assert most == prefetch + 1


@pytest.mark.parametrize("how", ["sync", "aclosing", "abandoned"])
def test_breaking_early_leaves_no_read_running(layered: Path, open_model, how: str) -> None:
    m = open_model(layered, cache_bytes="1MiB")
    count_reads(m, delay=0.2)
    cache = m._eng().cache

    async def walk_async() -> None:
        if how == "aclosing":
            async with contextlib.aclosing(m.alayers(prefetch=2)) as layers:
                async for i, _ in layers:
                    if i == 1:
                        break
            assert cache._flights == {}  # closed before the block ends
        else:
            async for i, _ in m.alayers(prefetch=2):
                if i == 1:
                    break

    if how == "sync":
        for i, _ in m.layers(prefetch=2):
            if i == 1:
                break
    else:
        asyncio.run(walk_async())
    if how == "abandoned":
        # Python closes an abandoned async generator late, as its loop shuts down; the reads
        # it started are stopped on lazyllama's loop all the same, promptly.
        deadline = time.monotonic() + 5
        while cache._flights and time.monotonic() < deadline:
            time.sleep(0.01)
    assert cache._flights == {}
    assert cache.stats().in_flight_bytes == 0
    cache.check()


async def test_alayers_equal_layers(layered: Path) -> None:
    async with await lazyllama.aopen(layered) as m:
        got = [(i, dict(layer)) async for i, layer in m.alayers()]
    expected = oracle_f16(layered)
    assert [i for i, _ in got] == list(range(6))
    for i, layer in got:
        for short, arr in layer.items():
            assert same_bits(arr, expected[f"model.layers.{i}.{short}"])


# -- planning reads ------------------------------------------------------------------------


def test_neighbours_are_read_as_one_range_and_large_ones_in_chunks() -> None:
    ranges = [
        Range("a", "f", 100, 10, 2),
        Range("b", "f", 110, 30, 2),
        Range("c", "f", 200, 4, 2),  # a gap: a new piece
        Range("d", "g", 140, 50, 2),  # another file: a new piece
    ]
    pieces = plan(ranges, chunk=16)
    spans = [(p.file, p.offset, p.nbytes) for p in pieces]
    assert spans == [
        ("f", 100, 16),
        ("f", 116, 16),
        ("f", 132, 8),
        ("f", 200, 4),
        ("g", 140, 16),
        ("g", 156, 16),
        ("g", 172, 16),
        ("g", 188, 2),
    ]
    first = pieces[0].segments
    assert [(s.target, s.start, s.nbytes, s.target_start) for s in first] == [
        ("a", 0, 10, 0),
        ("b", 10, 6, 0),
    ]


def test_a_layer_is_read_in_few_ranges(layered: Path, open_model) -> None:
    m = open_model(layered, cache_bytes=0)
    names = list(m.layer_names(0).values())
    m.load(names)
    # Nine neighbouring tensors: far fewer reads than tensors.
    assert m._eng().files.reads <= 2
