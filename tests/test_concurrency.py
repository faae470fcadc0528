"""Concurrency and cancellation: many tasks and threads reading one model under a budget that
forces eviction, some requests cancelled mid-flight; every answer right, the books balanced,
nothing left behind by ``close()``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import lazyllama
import lazyllama.cache
from lazyllama import _sync
from lazyllama.writer import save_file

from ._robust_helpers import (
    MINI_CONFIG,
    lazyllama_threads,
    new_threads,
    open_fds,
    open_loops,
    quiesce,
    settle_runtime,
    watchdog,
    write_index,
)
from .conftest import oracle_f16, same_bits, st_save

TASKS = 50
ASYNC_OPS = 2000
THREAD_OPS = 150
CANCEL_SHARE = 0.1


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 tensors of BF16, F16 and F32 in three shards, two written by the safetensors
    package and one by the project's writer, with an index and a config."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(7)
    dtypes = [ml_dtypes.bfloat16, np.float16, np.float32]
    tensors: dict[str, np.ndarray] = {}
    for i in range(40):
        if i % 10 == 0:  # a few large ones, so reads take long enough to be cancelled mid-way
            shape: tuple[int, ...] = (512, 1024)
        elif i % 7 == 0:
            shape = (int(rng.integers(1, 300)),)
        else:
            shape = (int(rng.integers(1, 96)), int(rng.integers(1, 300)))
        values = rng.standard_normal(shape, dtype=np.float32) * 4
        tensors[f"t{i:02d}"] = values.astype(dtypes[i % 3])
    names = list(tensors)
    shards = {
        "model-00001-of-00003.safetensors": names[:14],
        "model-00002-of-00003.safetensors": names[14:27],
        "model-00003-of-00003.safetensors": names[27:],
    }
    weight_map = {}
    for i, (fname, part) in enumerate(shards.items()):
        arrays = {n: tensors[n] for n in part}
        if i == 1:
            save_file(arrays, root / fname, {"format": "pt"})
        else:
            st_save(arrays, root / fname, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    write_index(root, weight_map)
    (root / "config.json").write_text(json.dumps(MINI_CONFIG))
    return root


@pytest.fixture(scope="module")
def want(mixed: Path) -> dict[str, np.ndarray]:
    return oracle_f16(mixed)


def _random_index(rng: random.Random, rows: int) -> Any:
    """An int (maybe negative) or a slice (maybe stepped, maybe empty) over ``rows``."""
    r = rng.random()
    if r < 0.3:
        return rng.randrange(-rows, rows)
    a, b = sorted(rng.randrange(0, rows + 1) for _ in range(2))
    if r < 0.8:
        return slice(a, b)
    if r < 0.9:
        return slice(a, b, rng.choice([2, 3]))
    return slice(b, a - 1 if a else None, -rng.choice([1, 2]))


@pytest.mark.parametrize("recycle", [False, True], ids=["fresh-memory", "recycled-memory"])
def test_tasks_and_threads_under_a_small_budget_with_cancellations(
    mixed: Path, want: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, recycle: bool
) -> None:
    # Every array, however small, in memory the cache may recycle; or none.
    monkeypatch.setattr(lazyllama.cache, "RECYCLE_BYTES", 1 if recycle else 1 << 62)
    settle_runtime()
    fds_before, loops_before, threads_before = open_fds(), open_loops(), lazyllama_threads()
    total = sum(a.nbytes for a in want.values())
    budget = total // 3
    names = sorted(want)
    errors: list[str] = []
    seen: Counter[str] = Counter()

    def check(name: str, index: Any, got: np.ndarray, how: str) -> None:
        expect = want[name] if index is None else want[name][index]
        if not same_bits(np.asarray(got), np.asarray(expect)):
            errors.append(f"{how} {name}[{index}]: wrong data")

    model = lazyllama.open(mixed, cache_bytes=budget)

    def blocking(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(THREAD_OPS):
                name = rng.choice(names)
                if rng.random() < 0.5:
                    check(name, None, model[name].load(), "load()")
                else:
                    index = _random_index(rng, want[name].shape[0])
                    check(name, index, model[name][index], "t[i]")
                seen["thread"] += 1
        except BaseException as e:
            errors.append(f"thread {seed}: {e!r}")

    async def one(rng: random.Random) -> None:
        name = rng.choice(names)
        index = None if rng.random() < 0.5 else _random_index(rng, want[name].shape[0])
        t = model[name]
        job = asyncio.ensure_future(t.aload() if index is None else t.agetitem(index))
        cancel = rng.random() < CANCEL_SHARE
        if cancel:
            await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.001, 0.005]))
            job.cancel()
        try:
            got = await job
        except asyncio.CancelledError:
            seen["cancelled"] += 1
            if not cancel:
                errors.append(f"{name}[{index}]: cancelled though nobody cancelled it")
            return
        except BaseException as e:
            errors.append(f"{name}[{index}]: {e!r}")
            return
        seen["async"] += 1
        check(name, index, got, "aload/agetitem")

    async def worker(i: int) -> None:
        rng = random.Random(1000 + i)
        for _ in range(ASYNC_OPS // TASKS):
            await one(rng)

    async def main() -> None:
        await asyncio.gather(*(worker(i) for i in range(TASKS)))

    threads = [threading.Thread(target=blocking, args=(s,), name=f"reader{s}") for s in (1, 2)]
    try:
        with watchdog(180):
            for th in threads:
                th.start()
            asyncio.run(main())
            for th in threads:
                th.join()

        assert not errors, errors[:10]
        assert seen["thread"] == 2 * THREAD_OPS
        assert seen["cancelled"] > 0 and seen["async"] + seen["cancelled"] == ASYNC_OPS

        stats = quiesce(model)  # books balanced, within budget: Cache.check()
        assert stats.in_flight_bytes == 0
        assert not model._eng().cache._flights
        assert not any(model._eng().cache._pinned.values())
        assert (stats.recycled > 0) == recycle
        assert stats.evictions > 0, "the budget was meant to force eviction"
        assert stats.peak_resident_bytes <= budget
        assert stats.resident_bytes <= budget
        # The cache still answers right after all that.
        for name in names:
            assert same_bits(model[name].load(), want[name])
    finally:
        model.close()
    assert new_threads(threads_before) == []
    assert _sync._runtime is None
    assert open_fds() <= fds_before, open_fds() - fds_before
    assert open_loops() <= loops_before

    with pytest.raises(lazyllama.ClosedError) as info:
        model.cache_stats()
    assert str(mixed) in str(info.value)


def test_use_after_close_raises_closed_error_naming_the_file(mixed: Path) -> None:
    model = lazyllama.open(mixed)
    t = model["t01"]
    t.load()
    model.close()
    for use in (
        t.load,
        lambda: t[0:1],
        lambda: model.load(["t01"]),
        lambda: model["t02"].load(),
        model.cache_stats,
    ):
        with pytest.raises(lazyllama.ClosedError) as info:
            use()
        assert str(mixed) in str(info.value)


def test_use_after_close_leaves_no_background_thread(mixed: Path) -> None:
    """A failed call on a closed model must not start a loop that nothing will stop."""
    settle_runtime()
    fds_before, threads_before = open_fds(), lazyllama_threads()
    model = lazyllama.open(mixed)
    model["t01"].load()
    model.close()
    assert new_threads(threads_before) == []
    with pytest.raises(lazyllama.ClosedError):
        model["t01"].load()
    with pytest.raises(lazyllama.ClosedError):
        model["t01"][0]
    try:
        assert new_threads(threads_before) == [], "a runtime was started for a closed model"
        assert _sync._runtime is None
        assert open_fds() <= fds_before
    finally:
        settle_runtime()


async def test_async_use_after_aclose(mixed: Path) -> None:
    model = await lazyllama.aopen(mixed)
    await model["t03"].aload()
    await model.aclose()
    with pytest.raises(lazyllama.ClosedError) as info:
        await model["t03"].aload()
    assert str(mixed) in str(info.value)
    with pytest.raises(lazyllama.ClosedError):
        await model["t03"].agetitem(0)
    settle_runtime()


def test_a_request_joining_a_read_just_abandoned_gets_its_data(
    mixed: Path, want: dict[str, np.ndarray]
) -> None:
    """Caller A starts reading a tensor and is cancelled; caller B asks for the same tensor
    before the abandoned read has wound down. B was never cancelled: it must get the array,
    not A's CancelledError."""
    name = "t00"  # one of the large ones: its read is still under way when A gives up

    async def race(model: lazyllama.LazyModel) -> list[Any]:
        a = asyncio.ensure_future(model[name].aload())
        for _ in range(3):  # let A's read start
            await asyncio.sleep(0)
        assert name in model._eng().cache._flights
        a.cancel()
        b = asyncio.ensure_future(model[name].aload())
        return await asyncio.gather(a, b, return_exceptions=True)

    with watchdog(60), lazyllama.open(mixed, cache_bytes=None) as model:
        # Run on lazyllama's own loop, where the ordering of the two callers is exact.
        a, b = _sync.sync(race(model))
        assert isinstance(a, asyncio.CancelledError)
        assert not isinstance(b, BaseException), f"B got {b!r}"
        assert same_bits(b, want[name])
        quiesce(model)


def test_cancelling_every_waiter_stops_the_read_and_frees_the_budget(
    mixed: Path, want: dict[str, np.ndarray]
) -> None:
    async def cancel_all() -> None:
        jobs = [asyncio.ensure_future(model[n].aload()) for n in ("t00", "t10", "t20", "t30")]
        await asyncio.sleep(0.001)
        for j in jobs:
            j.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    budget = 3 << 20
    with watchdog(60), lazyllama.open(mixed, cache_bytes=budget) as model:
        asyncio.run(cancel_all())
        stats = quiesce(model)
        assert stats.in_flight_bytes == 0 and stats.resident_bytes <= budget
        assert same_bits(model["t20"].load(), want["t20"])  # and it still reads


def test_many_threads_on_one_tensor_read_it_once(mixed: Path, want: dict[str, np.ndarray]) -> None:
    """Single flight across threads: however many ask at once, one read."""
    barrier = threading.Barrier(8)
    results: list[np.ndarray] = []

    def go() -> None:
        barrier.wait()
        results.append(model["t10"].load())

    with watchdog(60), lazyllama.open(mixed, cache_bytes=None) as model:
        threads = [threading.Thread(target=go) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stats = model.cache_stats()
        assert len(results) == 8 and all(same_bits(r, want["t10"]) for r in results)
        assert stats.misses == 1 and stats.bytes_read == want["t10"].nbytes


def test_cancelling_while_a_file_is_being_opened_leaves_no_unclosed_file(mixed: Path) -> None:
    """A request cancelled while its file handle is being opened (on a worker thread): the
    handle, once open, is closed or kept for reuse, not dropped for the garbage collector."""
    import lazyllama.io

    real_open = lazyllama.io.aiofiles.open
    opening = threading.Event()

    def slow_opener(path: str, flags: int) -> int:
        opening.set()
        time.sleep(0.2)
        return os.open(path, flags)

    def patched(*args: Any, **kwargs: Any) -> Any:
        return real_open(*args, **{**kwargs, "opener": slow_opener})

    async def cancel_while_opening(model: lazyllama.LazyModel) -> None:
        job = asyncio.ensure_future(model["t05"].aload())
        while not opening.is_set():
            await asyncio.sleep(0.005)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        await asyncio.sleep(0.4)  # the open finishes on its thread meanwhile

    with (
        watchdog(60),
        lazyllama.open(mixed) as model,
        warnings.catch_warnings(record=True) as record,
    ):
        warnings.simplefilter("always")
        with pytest.MonkeyPatch.context() as patch:  # the headers are read by now
            patch.setattr(lazyllama.io.aiofiles, "open", patched)
            asyncio.run(cancel_while_opening(model))
        quiesce(model)
        gc.collect()
        unclosed = [str(w.message) for w in record if issubclass(w.category, ResourceWarning)]
        assert unclosed == []
        assert model["t05"].load().shape == model["t05"].shape
