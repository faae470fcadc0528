"""LazyModel and LazyTensor: lazy opening, reads on first access, rows, sync and async use."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import lazyllama
from lazyllama import ClosedError, TensorNotFoundError

from .conftest import oracle_f16, rchar, same_bits, st_save


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 MiB BF16 file: reading any of its data would show in the byte counts."""
    rng = np.random.default_rng(0)
    tensors = {
        f"w{i}": rng.standard_normal((1024, 4096), dtype=np.float32).astype(ml_dtypes.bfloat16)
        for i in range(6)
    }
    tensors["norm"] = np.ones(4096, ml_dtypes.bfloat16)
    return st_save(tensors, tmp_path_factory.mktemp("big") / "model.safetensors")


def test_open_reads_only_header_bytes(big_file: Path) -> None:
    header_bytes = 8 + int.from_bytes(big_file.read_bytes()[:8], "little")
    before = rchar()
    m = lazyllama.open(big_file)
    read = rchar() - before
    try:
        # The kernel's count of bytes read: the header, and nothing of the 48 MiB of data.
        assert header_bytes <= read < header_bytes + 64 * 1024
        assert m.cache_stats().bytes_read == 0
        t = m["w3"]
        assert t.shape == (1024, 4096) and t.source_dtype == "BF16" and t.nbytes == 8 << 20
        assert t.file == str(big_file) and t.offset > header_bytes - 1
        assert rchar() - before < header_bytes + 64 * 1024  # a LazyTensor reads nothing
        before = rchar()
        t.load()
        assert rchar() - before >= t.nbytes
    finally:
        m.close()


def test_load_caches_and_is_bit_exact(big_file: Path, open_model) -> None:
    m = open_model(big_file, cache_bytes="64MiB")
    expected = oracle_f16(big_file)
    a = m["w1"].load()
    assert same_bits(a, expected["w1"])
    assert m["w1"].load() is a  # second access is a cache hit
    s = m.cache_stats()
    assert (s.hits, s.misses, s.bytes_read) == (1, 1, a.nbytes)
    assert not a.flags.writeable  # the cached array is shared: read-only
    assert same_bits(np.asarray(m["w1"]), expected["w1"])
    assert np.asarray(m["norm"], dtype=np.float32).dtype == np.float32


async def test_aload_from_the_callers_loop(big_file: Path) -> None:
    m = await lazyllama.aopen(big_file)
    try:
        expected = oracle_f16(big_file)
        got = await asyncio.gather(*(m[f"w{i}"].aload() for i in range(6)))
        for i, a in enumerate(got):
            assert same_bits(a, expected[f"w{i}"])
        assert same_bits((await m.aload(["norm"]))["norm"], expected["norm"])
    finally:
        await m.aclose()


def test_blocking_load_inside_a_running_loop(big_file: Path, open_model) -> None:
    """As in Jupyter: the main thread's loop is running when a blocking call is made."""
    m = open_model(big_file)

    async def notebook_cell() -> np.ndarray:
        return m["w2"].load()

    assert same_bits(asyncio.run(notebook_cell()), oracle_f16(big_file)["w2"])


def test_blocking_loads_from_many_threads(big_file: Path, open_model) -> None:
    m = open_model(big_file, cache_bytes=0)
    expected = oracle_f16(big_file)
    results: dict[tuple[int, str], np.ndarray] = {}

    def work(k: int) -> None:
        for name in ("w0", "w4", "norm"):
            results[(k, name)] = m[name].load()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 18
    assert all(same_bits(a, expected[name]) for (_, name), a in results.items())


@pytest.mark.parametrize(
    "index",
    [
        slice(3, 19),
        5,
        -1,
        slice(None, None, 7),
        slice(900, 10, -13),
        (slice(2, 6), slice(100, 110)),
        (7, 3),
        slice(2000, 3000),
        slice(5, 5),
    ],
)
def test_rows_read_only_their_bytes(big_file: Path, open_model, index) -> None:
    m = open_model(big_file, cache_bytes=0)
    expected = oracle_f16(big_file)["w5"]
    got = m["w5"][index]
    assert same_bits(got, np.asarray(expected[index]))
    first = index[0] if isinstance(index, tuple) else index
    rows = len(range(1024)[first]) if isinstance(first, slice) else 1
    span = range(1024)[first] if isinstance(first, slice) else [first % 1024]
    width = (max(span) - min(span) + 1) if rows else 0
    assert m._eng().files.bytes_read == width * 4096 * 2  # BF16 bytes of those rows alone


def test_row_index_out_of_range(big_file: Path, open_model) -> None:
    with pytest.raises(IndexError, match="w0"):
        open_model(big_file)["w0"][1024]


def test_rows_of_a_cached_tensor_come_from_the_cache(big_file: Path, open_model) -> None:
    m = open_model(big_file)
    full = m["w0"].load()
    read = m._eng().files.bytes_read
    assert same_bits(m["w0"][10:20], full[10:20])
    assert m._eng().files.bytes_read == read


def test_unknown_tensor_names_the_file(big_file: Path, open_model) -> None:
    m = open_model(big_file)
    with pytest.raises(TensorNotFoundError) as info:
        m["nope"]
    assert isinstance(info.value, KeyError)
    assert "nope" in str(info.value) and str(big_file) in str(info.value)
    with pytest.raises(TensorNotFoundError):
        m.load(["w0", "nope"])


def test_mapping_and_repr(big_file: Path, open_model) -> None:
    m = open_model(big_file)
    assert len(m) == 7 and "w0" in m and set(m) == {"norm", *(f"w{i}" for i in range(6))}
    assert "w0" in repr(m["w0"]) and "BF16" in repr(m["w0"])
    assert len(m["w0"]) == 1024 and m["w0"].ndim == 2 and m["w0"].dtype == np.float16


def test_close_and_use_after_close(big_file: Path) -> None:
    with lazyllama.open(big_file) as m:
        m["norm"].load()
    with pytest.raises(ClosedError) as info:
        m["norm"].load()
    assert str(big_file) in str(info.value)
    m.close()  # closing twice is harmless


async def test_async_with(big_file: Path) -> None:
    async with await lazyllama.aopen(big_file) as m:
        assert (await m["norm"].aload()).sum() == 4096
    with pytest.raises(ClosedError):
        await m["norm"].aload()


def test_background_loop_stops_with_the_last_model(big_file: Path) -> None:
    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("lazyllama")]

    assert ours() == []
    a, b = lazyllama.open(big_file), lazyllama.open(big_file)
    a["norm"].load()
    a.close()
    assert "lazyllama-loop" in ours()
    b["norm"].load()
    b.close()
    assert ours() == []


def test_cache_bytes_strings(big_file: Path, open_model) -> None:
    assert open_model(big_file, cache_bytes="1.5GB").cache_bytes == 1_500_000_000
    assert open_model(big_file, cache_bytes="512MiB").cache_bytes == 512 << 20
    assert open_model(big_file, cache_bytes=0).cache_bytes == 0
    with pytest.raises(ValueError, match="byte size"):
        lazyllama.open(big_file, cache_bytes="lots")


def test_seed_entry_points(demo_dir: Path) -> None:
    config, weights = lazyllama.load_llama3_from_safetensors(demo_dir)
    try:
        assert config.hidden_size == 128 and len(weights) == 39
        assert isinstance(weights["model.norm.weight"], lazyllama.LazyTensor)
        assert weights.cache_stats().bytes_read == 0
    finally:
        weights.close()
    for cls in (lazyllama.SafeTensorsModelLoader, lazyllama.MultiFileSafeTensorsLoader):
        loader = cls(demo_dir)
        try:
            assert loader.load_config().num_hidden_layers == 4
            w = loader.load_weights_f16()
            assert w["model.norm.weight"].load().dtype == np.float16
        finally:
            loader.close()


def test_exported_names_are_complete_and_sorted() -> None:
    public = {n for n in dir(lazyllama) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(lazyllama.__all__)
    assert lazyllama.__all__ == sorted(lazyllama.__all__, key=lambda n: (n[0].islower(), n))
