"""Shared pieces of the robustness tests: an independent reader (the ``safetensors`` package
plus ml_dtypes casts), fixture writers, and probes for leaked threads, descriptors and loops."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import gc
import json
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import lazyllama
from lazyllama import _sync

# Every dtype string of the format: its width in bits and the numpy type that holds it (None for
# the packed sub-byte types). Written out here rather than taken from lazyllama, so the tests do
# not trust the table they are testing.
ST_DTYPES: dict[str, tuple[int, Any]] = {
    "BOOL": (8, np.bool_),
    "U8": (8, np.uint8),
    "I8": (8, np.int8),
    "U16": (16, np.uint16),
    "I16": (16, np.int16),
    "U32": (32, np.uint32),
    "I32": (32, np.int32),
    "U64": (64, np.uint64),
    "I64": (64, np.int64),
    "F16": (16, np.float16),
    "BF16": (16, ml_dtypes.bfloat16),
    "F32": (32, np.float32),
    "F64": (64, np.float64),
    "C64": (64, np.complex64),
    "F8_E4M3": (8, ml_dtypes.float8_e4m3fn),
    "F8_E5M2": (8, ml_dtypes.float8_e5m2),
    "F8_E8M0": (8, ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": (8, ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": (8, ml_dtypes.float8_e5m2fnuz),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}
FLOAT_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)


def decode(raw: bytes | bytearray | memoryview, dtype: str, shape: Any) -> np.ndarray:
    """Little-endian bytes of a safetensors dtype as an array of its own numpy type."""
    np_type = ST_DTYPES[dtype][1]
    assert np_type is not None, dtype
    arr = np.frombuffer(bytes(raw), dtype=np.dtype(np_type).newbyteorder("<"))
    return arr.reshape(tuple(shape)).astype(np.dtype(np_type), copy=False)


def as_float16(arr: np.ndarray) -> np.ndarray:
    """The float16 array a float tensor should become (the ml_dtypes / numpy cast)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(np.float16)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and values, NaN equal to NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or a.dtype.name in ("bfloat16",) or a.dtype.name.startswith("float8"):
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def st_deserialize(blob: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the ``safetensors`` package reads from a whole file's bytes, or None if it refuses."""
    from safetensors import deserialize

    try:
        items = deserialize(blob)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # SafetensorError, or a Rust panic surfaced as PanicException
        return None
    return {name: (d["dtype"], tuple(d["shape"]), bytes(d["data"])) for name, d in items}


def write_raw(path: Path, header: bytes | Mapping[str, Any], data: bytes = b"") -> Path:
    """A file of an 8-byte length, the header bytes (or a JSON object) and ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


MINI_CONFIG: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 64,
}


def write_index(folder: Path, weight_map: Mapping[str, str]) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": dict(weight_map)}))
    return path


# -- leak probes ----------------------------------------------------------------------------


def open_fds() -> set[str]:
    """Descriptors this process holds."""
    return set(os.listdir("/proc/self/fd"))


def fd_targets(fds: set[str]) -> dict[str, str]:
    out = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def lazyllama_threads() -> set[threading.Thread]:
    """Threads lazyllama started (they are all named so), alive now."""
    return {t for t in threading.enumerate() if t.name.startswith("lazyllama")}


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Names of lazyllama threads alive now that were not alive at ``before``."""
    return sorted(t.name for t in lazyllama_threads() - before)


def open_loops() -> int:
    """Event loops alive and not closed."""
    gc.collect()
    with warnings.catch_warnings():  # some modules' objects warn when merely inspected
        warnings.simplefilter("ignore")
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()
        )


def settle_runtime() -> None:
    """Stop a background runtime no open model holds (one a failed test may have left), so
    a leak check starts from a clean process; a model left open elsewhere is an error."""
    if _sync._runtime is not None and _sync._users == 0:
        _sync.retain()
        _sync.release()
    assert _sync._runtime is None, "a model opened before this test is still open"


def quiesce(model: lazyllama.LazyModel, timeout: float = 10.0) -> lazyllama.CacheStats:
    """Wait, on the model's own loop, until no read is in flight; then check the books.

    A cancelled request returns to its caller at once while the read behind it winds down on
    the background loop, so "nothing in flight" is a state reached shortly after, not at once.
    """

    async def settle() -> lazyllama.CacheStats:
        cache = model._eng().cache
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while cache._flights or cache.stats().in_flight_bytes:
            if loop.time() > deadline:
                raise AssertionError(
                    f"still in flight after {timeout}s: {list(cache._flights)}, "
                    f"{cache.stats().in_flight_bytes} bytes"
                )
            await asyncio.sleep(0.01)
        cache.check()
        return cache.stats()

    return _sync.sync(settle())


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Dump every thread's stack and end the process if the block hangs for ``seconds``,
    so a deadlock fails loudly instead of stalling the run."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Failing:
    """Make the next ``times`` calls of a function (awaitable unless ``sync``) raise ``error``."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, owner: Any, method: str, sync: bool = False
    ) -> None:
        self.real = real = getattr(owner, method)
        self.times = 0
        self.error: BaseException = OSError(errno.EIO, "Input/output error")
        failing = self

        def fail() -> None:
            if failing.times:
                failing.times -= 1
                raise failing.error

        def fake(*args: Any, **kwargs: Any) -> Any:
            fail()
            return real(*args, **kwargs)

        async def afake(*args: Any, **kwargs: Any) -> Any:
            fail()
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, method, fake if sync else afake)
