"""Files that change under an open model, and reads the OS fails.

A shard truncated or replaced after ``open()`` gives a ``ReadError`` naming it, never zeros or a
short array; a failing read surfaces as ``ReadError``, leaves nothing cached or in flight, and
the next request reads again and gets the right data.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import lazyllama
import lazyllama.io
from lazyllama.writer import save_file

from ._robust_helpers import MINI_CONFIG, Failing, quiesce, watchdog, write_index
from .conftest import oracle_f16, same_bits, st_save


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_bf16": rng.standard_normal((64, 96), dtype=np.float32).astype(ml_dtypes.bfloat16),
        "w_f32": rng.standard_normal((48, 80), dtype=np.float32),
        "w_f16": rng.standard_normal((32, 40), dtype=np.float32).astype(np.float16),
    }


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """A folder with one indexed shard of three tensors; the shard's path is returned."""
    path = tmp_path / "model-00001-of-00001.safetensors"
    st_save(_tensors(0), path)
    write_index(tmp_path, dict.fromkeys(_tensors(0), path.name))
    (tmp_path / "config.json").write_text(json.dumps(MINI_CONFIG))
    return path


@pytest.fixture
def model(shard: Path) -> Iterator[lazyllama.LazyModel]:
    with watchdog(60), lazyllama.open(shard.parent) as m:
        yield m


READS: dict[str, Callable[[lazyllama.LazyTensor], np.ndarray]] = {
    "load": lambda t: t.load(),
    "rows": lambda t: t[3:9],
    "row": lambda t: t[-1],
}


def assert_read_error(read: Callable[[], Any], path: Path) -> lazyllama.ReadError:
    with pytest.raises(lazyllama.ReadError) as info:
        got = read()
        pytest.fail(f"read gave {got!r} instead of an error")  # pragma: no cover
    assert str(path) in str(info.value), info.value
    assert isinstance(info.value, OSError)
    return info.value


def assert_nothing_left(m: lazyllama.LazyModel, names: list[str]) -> None:
    stats = quiesce(m, timeout=1.0)  # a failed read winds down in milliseconds
    assert stats.in_flight_bytes == 0
    cache = m._eng().cache
    assert not any(n in cache._entries for n in names), "a failed read was cached"


# -- truncated ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(READS))
@pytest.mark.parametrize("cut", ["to_header", "mid_tensor", "last_byte", "empty"])
def test_truncated_after_open_is_a_read_error(
    model: lazyllama.LazyModel, shard: Path, how: str, cut: str
) -> None:
    model["w_f16"].load()  # a handle open and pooled before the cut
    t = model["w_bf16"]
    keep = {
        "to_header": t.offset,
        "mid_tensor": t.offset + t.nbytes // 2,
        "last_byte": shard.stat().st_size - 1,
        "empty": 0,
    }[cut]
    os.truncate(shard, keep)
    for name in ("w_bf16", "w_f32"):
        assert_read_error(lambda n=name: READS[how](model[n]), shard)
    assert_nothing_left(model, ["w_bf16", "w_f32"])


def test_truncated_then_restored_reads_again(
    model: lazyllama.LazyModel, shard: Path, tmp_path: Path
) -> None:
    """The check is against the file as opened, so putting it back (same bytes, same times)
    makes it readable again: errors are not remembered."""
    backup = tmp_path / "backup"
    shutil.copy2(shard, backup)
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert_read_error(model["w_f32"].load, shard)
    with open(shard, "r+b") as f:  # same inode, same bytes, same times as when opened
        f.write(backup.read_bytes())
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert same_bits(model["w_f32"].load(), oracle_f16(backup)["w_f32"])


# -- replaced -------------------------------------------------------------------------------


def _replace_with(shard: Path, tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    other = tmp_path / "other.safetensors"
    save_file(tensors, other)
    os.replace(other, shard)


@pytest.mark.parametrize("how", sorted(READS))
def test_replaced_by_a_file_of_another_size(
    model: lazyllama.LazyModel, shard: Path, tmp_path: Path, how: str
) -> None:
    model["w_f16"].load()
    bigger = {**_tensors(1), "extra": np.ones(1000, np.float32)}
    _replace_with(shard, tmp_path, bigger)
    assert shard.stat().st_size != model._stamps[str(shard)].size
    assert_read_error(lambda: READS[how](model["w_bf16"]), shard)
    assert_nothing_left(model, ["w_bf16"])


@pytest.mark.parametrize("how", sorted(READS))
def test_replaced_by_a_file_of_the_same_size(
    model: lazyllama.LazyModel, shard: Path, tmp_path: Path, how: str
) -> None:
    """Same layout, other values, even the old modification time: a different file all the
    same (os.replace gives it another inode)."""
    model["w_f16"].load()
    before = shard.stat()
    _replace_with(shard, tmp_path, _tensors(2))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size
    error = assert_read_error(lambda: READS[how](model["w_bf16"]), shard)
    assert "changed" in str(error)


@pytest.mark.parametrize("how", sorted(READS))
def test_same_file_with_a_new_modification_time(
    model: lazyllama.LazyModel, shard: Path, how: str
) -> None:
    model["w_f16"].load()
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert_read_error(lambda: READS[how](model["w_f32"]), shard)


def test_deleted_after_open(model: lazyllama.LazyModel, shard: Path) -> None:
    model["w_f16"].load()
    shard.unlink()
    assert_read_error(model["w_bf16"].load, shard)
    assert_read_error(lambda: model["w_f32"][0], shard)


def test_cached_tensors_stay_readable_after_a_change(
    model: lazyllama.LazyModel, shard: Path
) -> None:
    """What was read before the change was read from the file as opened: it stays valid, and
    rows of it come from the cache, not the changed file."""
    want = oracle_f16(shard)["w_bf16"]
    model["w_bf16"].load()
    os.truncate(shard, 8)
    assert same_bits(model["w_bf16"].load(), want)
    assert same_bits(model["w_bf16"][5:7], want[5:7])
    assert_read_error(model["w_f32"].load, shard)


# -- the OS fails a read --------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(READS))
@pytest.mark.parametrize("name", ["w_bf16", "w_f32", "w_f16"])
def test_an_os_read_error_is_a_read_error_and_a_retry_succeeds(
    model: lazyllama.LazyModel, shard: Path, monkeypatch: pytest.MonkeyPatch, how: str, name: str
) -> None:
    want = oracle_f16(shard)[name]
    index = {"load": ..., "rows": slice(3, 9), "row": -1}[how]
    failing = Failing(monkeypatch, os, "preadv", sync=True)
    failing.times = 1
    error = assert_read_error(lambda: READS[how](model[name]), shard)
    assert "Input/output error" in str(error)
    assert failing.times == 0
    assert_nothing_left(model, [name])
    handles = model._eng().files.open_handles
    assert handles <= model.concurrency
    got = READS[how](model[name])
    assert same_bits(np.asarray(got), want[index])
    if how == "load":
        assert model.cache_stats().resident_bytes == want.nbytes
    assert_nothing_left(model, [] if how == "load" else [name])


def test_a_retry_after_a_read_error_fits_a_budget_just_above_the_tensor(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed read's reservation is given back: a budget with room for one copy of the
    tensor is enough for the retry (it would wait for room forever otherwise)."""
    want = oracle_f16(shard)["w_f32"]
    failing = Failing(monkeypatch, os, "preadv", sync=True)

    async def retry(m: lazyllama.LazyModel) -> np.ndarray:
        return await asyncio.wait_for(m["w_f32"].aload(), 3)

    with watchdog(60), lazyllama.open(shard.parent, cache_bytes=want.nbytes + 100) as m:
        failing.times = 1
        assert_read_error(m["w_f32"].load, shard)
        assert same_bits(asyncio.run(retry(m)), want)


def test_a_read_error_while_others_wait_reaches_every_waiter(
    model: lazyllama.LazyModel, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads asking for the same tensor share one read: when it fails, each of them gets
    the ReadError (none hangs, none gets data), and the next request reads again."""
    import threading

    failing = Failing(monkeypatch, os, "preadv", sync=True)
    failing.times = 1
    gate = threading.Barrier(4)
    outcomes: list[Any] = []

    def ask() -> None:
        gate.wait()
        try:
            outcomes.append(model["w_f32"].load())
        except lazyllama.ReadError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    errors = [o for o in outcomes if isinstance(o, lazyllama.ReadError)]
    assert len(outcomes) == 4 and errors, outcomes
    want = oracle_f16(shard)["w_f32"]
    assert all(same_bits(o, want) for o in outcomes if not isinstance(o, BaseException))
    assert same_bits(model["w_f32"].load(), want)


def test_a_short_read_from_the_os_is_a_read_error(
    model: lazyllama.LazyModel, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read returning 0 before the range is full (the file ended) is not taken as data."""
    real = os.preadv
    short = {"left": 1}

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if short["left"]:
            short["left"] -= 1
            return 0
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    error = assert_read_error(model["w_f32"].load, shard)
    assert "short read" in str(error)
    assert_nothing_left(model, ["w_f32"])
    assert same_bits(model["w_f32"].load(), oracle_f16(shard)["w_f32"])


def test_partial_reads_from_the_os_are_completed(
    model: lazyllama.LazyModel, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read may return fewer bytes than asked without being at the end: keep reading."""
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        return real(fd, [buffers[0][:7]], offset)

    monkeypatch.setattr(os, "preadv", preadv)
    want = oracle_f16(shard)
    for name in want:
        assert same_bits(model[name].load(), want[name])


def test_without_a_positional_read_threads_seek_and_read_in_turn(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the OS has no positional read (Windows), reads sharing a handle seek and read
    one at a time: many at once, uncached, each still gets its own rows."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delattr(os, "preadv")
    want = oracle_f16(shard)
    asks = [(name, i) for name in want for i in range(len(want[name]))] * 3
    with (
        watchdog(60),
        lazyllama.open(shard.parent, cache_bytes=0) as m,
        ThreadPoolExecutor(8) as pool,
    ):
        got = list(pool.map(lambda ask: m[ask[0]][ask[1]], asks))
    for (name, i), row in zip(asks, got, strict=True):
        assert same_bits(row, want[name][i])


def test_a_failure_to_open_the_file_is_a_read_error_and_a_retry_succeeds(
    model: lazyllama.LazyModel, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = Failing(monkeypatch, lazyllama.io.aiofiles, "open")
    failing.error = OSError(errno.EMFILE, "Too many open files")
    failing.times = 1
    error = assert_read_error(model["w_f32"].load, shard)
    assert "Too many open files" in str(error)
    assert_nothing_left(model, ["w_f32"])
    assert same_bits(model["w_f32"].load(), oracle_f16(shard)["w_f32"])


def test_every_read_waiting_on_a_failed_open_gets_the_read_error(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads of one file share its opening: when that fails, each of them raises ReadError
    naming the file, and the next read opens it afresh."""
    from concurrent.futures import ThreadPoolExecutor

    real = lazyllama.io.aiofiles.open
    fails = {"left": 1}

    async def slow_failing_open(*args: Any, **kwargs: Any) -> Any:
        if fails["left"]:
            fails["left"] -= 1
            await asyncio.sleep(0.05)  # every reader waits on this opening by now
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*args, **kwargs)

    monkeypatch.setattr(lazyllama.io.aiofiles, "open", slow_failing_open)
    file = str(shard)

    async def main() -> tuple[list[Any], bool]:
        with ThreadPoolExecutor(2) as pool:
            files = lazyllama.io.FileSet({file: lazyllama.io.Stamp.of(os.stat(file))}, pool, 4)
            waiters = [files._acquire(file) for _ in range(4)]
            outcomes = await asyncio.gather(*waiters, return_exceptions=True)
            again = await files._acquire(file)
            opened = files.open_handles == 1 and not again.closed
            await files.aclose()
            return outcomes, opened

    outcomes, opened = asyncio.run(main())
    assert all(isinstance(o, lazyllama.ReadError) for o in outcomes), outcomes
    assert all(file in str(o) and "Too many open files" in str(o) for o in outcomes)
    assert opened


def test_an_error_on_one_shard_leaves_the_others_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _tensors(3)
    st_save({"w_bf16": tensors["w_bf16"]}, tmp_path / "a.safetensors")
    save_file({"w_f32": tensors["w_f32"]}, tmp_path / "b.safetensors")
    write_index(tmp_path, {"w_bf16": "a.safetensors", "w_f32": "b.safetensors"})
    (tmp_path / "config.json").write_text(json.dumps(MINI_CONFIG))
    with watchdog(60), lazyllama.open(tmp_path) as m:
        os.truncate(tmp_path / "a.safetensors", 10)
        assert_read_error(m["w_bf16"].load, tmp_path / "a.safetensors")
        with pytest.raises(lazyllama.ReadError):  # together: the error, and no partial result
            m.load(["w_f32", "w_bf16"])
        want = oracle_f16(tmp_path / "b.safetensors")["w_f32"]
        assert same_bits(m["w_f32"].load(), want)
        assert_nothing_left(m, ["w_bf16"])
