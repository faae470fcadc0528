"""``LazyModel`` and ``LazyTensor``: the public face of a checkpoint opened lazily.

Opening reads ``config.json``, the index and each shard's header, nothing more. A tensor's bytes
are read the first time it is asked for, converted (float16 by default) and kept in a cache held
to a byte budget. Every read runs on one background event loop; blocking methods wait on it and
their ``a``-prefixed twins await it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import warnings
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import numpy as np
from tqdm.auto import tqdm

from . import _sync
from .cache import Cache, CacheStats
from .checkpoint import Checkpoint, discover
from .config import LlamaConfig, load_config
from .dtypes import DTYPES, DType, convert_into, output_dtype
from .errors import (
    CheckpointError,
    ClosedError,
    Float16OverflowError,
    HeaderError,
    TensorNotFoundError,
    where,
)
from .format import Header, TensorInfo
from .io import FileSet, Range, Segment, Stamp, plan, read_header
from .units import parse_bytes
from .verify import MemoryReport, VerifyReport, memory_report, verify

__all__ = ["Float16OverflowWarning", "LazyModel", "LazyTensor", "aopen", "open"]

OnOverflow = Literal["warn", "raise", "ignore"]
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
DEFAULT_CACHE_BYTES = "2GiB"
DEFAULT_CONCURRENCY = 8
_UNBOUNDED_GROUP_BYTES = 1 << 30
T = TypeVar("T")


class Float16OverflowWarning(UserWarning):
    """Values beyond float16's range became infinite while a tensor was converted."""


def _progress_enabled(progress: bool | None) -> bool:
    if os.environ.get("LAZYLLAMA_DISABLE_PROGRESS_BARS", "").strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
    }:
        return False
    if progress is None:
        return sys.stderr.isatty()
    return progress


_RELEASED = np.empty(0, np.uint8)


@dataclass(slots=True)
class _Target:
    """Where a read lands: an output array (flat view), its source dtype, overflows seen."""

    name: str
    file: str
    flat: np.ndarray
    source: DType
    overflow: list[int]


class _Engine:
    """What a model needs on the running loop: file handles and the cache."""

    def __init__(self, model: LazyModel, rt: _sync.Runtime) -> None:
        self.rt = rt
        self.files = FileSet(model._stamps, rt.executor, model.concurrency)
        self.cache = Cache(model.cache_bytes)


class LazyTensor:
    """One tensor of a checkpoint: where it lives and what it holds, read only when asked."""

    __slots__ = ("_model", "info")

    def __init__(self, model: LazyModel, info: TensorInfo) -> None:
        self._model = model
        self.info = info

    name = property(lambda self: self.info.name)
    shape = property(lambda self: self.info.shape)
    source_dtype = property(lambda self: self.info.dtype)
    file = property(lambda self: self.info.file)
    offset = property(lambda self: self.info.offset)
    nbytes = property(lambda self: self.info.nbytes)
    ndim = property(lambda self: len(self.info.shape))
    size = property(lambda self: self.info.numel)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype ``load()`` returns (``UnsupportedDtypeError`` if it cannot)."""
        return self._model._out_dtype(self.info)

    def __len__(self) -> int:
        if not self.info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.info.shape[0]

    def __repr__(self) -> str:
        i = self.info
        return f"LazyTensor({i.name!r}, shape={list(i.shape)}, dtype={i.dtype}, file={i.file!r})"

    def load(self) -> np.ndarray:
        """The whole tensor as an array, read on first use and cached (read-only if cached)."""
        return self._model._run(self._model._get([self.info.name]))[self.info.name]

    async def aload(self) -> np.ndarray:
        """``load()`` without blocking the event loop."""
        return (await self._model._arun(self._model._get([self.info.name])))[self.info.name]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.load()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    def __getitem__(self, index: Any) -> np.ndarray:
        """Index the tensor; an int or slice on the first dimension reads only those rows."""
        return self._model._run(self._model._index(self.info, index))

    async def agetitem(self, index: Any) -> np.ndarray:
        """``t[index]`` without blocking the event loop."""
        return await self._model._arun(self._model._index(self.info, index))


class LazyModel(Mapping[str, LazyTensor]):
    """A checkpoint opened lazily: a mapping of tensor names to ``LazyTensor``."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        headers: list[Header],
        stamps: dict[str, Stamp],
        config: LlamaConfig | None,
        *,
        dtype: str | np.dtype[Any] | None = "float16",
        cache_bytes: int | str | None = DEFAULT_CACHE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_overflow: OnOverflow = "warn",
    ) -> None:
        if on_overflow not in ("warn", "raise", "ignore"):
            raise ValueError(
                f"on_overflow must be 'warn', 'raise' or 'ignore', not {on_overflow!r}"
            )
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.checkpoint = checkpoint
        self.path = (
            checkpoint.root
            if checkpoint.index or len(checkpoint.files) > 1
            else checkpoint.files[0]
        )
        self.headers = headers
        self._config = config
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.cache_bytes = parse_bytes(cache_bytes)
        self.concurrency = concurrency
        self.on_overflow: OnOverflow = on_overflow
        self.tensors = _tensor_table(checkpoint, headers)
        self._stamps = stamps  # as each file was when its header was read
        self._engine: _Engine | None = None
        self._closed = False
        _sync.retain()

    # -- mapping --------------------------------------------------------------------------

    def __getitem__(self, name: str) -> LazyTensor:
        info = self.tensors.get(name)
        if info is None:
            raise TensorNotFoundError(f"{where(self.path, name)}no such tensor in the checkpoint")
        return LazyTensor(self, info)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"LazyModel({os.fspath(self.path)!r}, tensors={len(self)}, dtype={self.dtype})"

    @property
    def config(self) -> LlamaConfig:
        """The parsed ``config.json``; ``CheckpointError`` if the checkpoint has none."""
        if self._config is None:
            raise CheckpointError(f"{where(self.checkpoint.config)}config.json not found")
        return self._config

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of every shard, merged."""
        return {k: v for h in self.headers for k, v in h.metadata.items()}

    # -- the engine ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{where(self.path)}the model is closed")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the background loop, blocking; refused once the model is closed."""
        if self._closed:
            coro.close()
            self._check_open()
        return _sync.sync(coro)

    async def _arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the background loop; refused once the model is closed."""
        if self._closed:
            coro.close()
            self._check_open()
        return await _sync.run_async(coro)

    def _eng(self) -> _Engine:
        """The engine for the current runtime; rebuilt after a fork, as the old loop is gone."""
        self._check_open()
        rt = _sync.runtime()
        eng = self._engine
        if eng is None or eng.rt is not rt:
            if eng is not None:  # a forked child: the parent's loop and handles are gone
                _sync.retain()
            self._engine = eng = _Engine(self, rt)
        return eng

    def _out_dtype(self, info: TensorInfo) -> np.dtype[Any]:
        return output_dtype(DTYPES[info.dtype], self.dtype, info.file, info.name)

    def _out_nbytes(self, info: TensorInfo) -> int:
        return info.numel * self._out_dtype(info).itemsize

    async def _read_rows(self, specs: Sequence[tuple[TensorInfo, int, int]]) -> list[np.ndarray]:
        """Read rows ``[start, stop)`` of each tensor (all of it for a 0-d one), converted."""
        eng = self._eng()
        ranges: list[Range] = []
        outs: list[np.ndarray] = []
        targets: list[_Target] = []
        for info, start, stop in specs:
            source = DTYPES[info.dtype]
            row_bytes = info.nbytes // info.rows if info.rows else 0
            out = eng.cache.empty((stop - start, *info.shape[1:]), self._out_dtype(info))
            if not info.shape:
                out = out.reshape(())
            outs.append(out)
            target = _Target(info.name, info.file, out.reshape(-1), source, [])
            targets.append(target)
            nbytes = (stop - start) * row_bytes
            if nbytes:
                offset = info.offset + start * row_bytes
                ranges.append(Range(target, info.file, offset, nbytes, source.bits // 8))
        try:
            await eng.files.run(plan(ranges, eng.files.chunk), _convert, _direct)
        finally:
            for t in targets:  # a worker may hold its job's pieces a moment longer: not the
                t.flat = _RELEASED  # outputs, which the cache may then find held by no one
        for t in targets:
            self._overflowed(t)
        return outs

    def _overflowed(self, t: _Target) -> None:
        count = sum(t.overflow)
        if not count or self.on_overflow == "ignore":
            return
        msg = (
            f"{where(t.file, t.name)}{count} values of {t.source.name} exceed float16's range "
            "and became infinite"
        )
        if self.on_overflow == "raise":
            raise Float16OverflowError(msg)
        warnings.warn(msg, Float16OverflowWarning, stacklevel=2)

    async def _read_whole(self, names: list[str]) -> dict[str, np.ndarray]:
        infos = [self.tensors[n] for n in names]
        arrays = await self._read_rows([(i, 0, i.rows) for i in infos])
        return dict(zip(names, arrays, strict=True))

    async def _get(
        self, names: Sequence[str], on_ready: Callable[[np.ndarray], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays for ``names`` through the cache: hits at once, misses read once, coalesced."""
        sizes = {n: self._out_nbytes(self[n].info) for n in names}
        return await self._eng().cache.get_many(list(names), sizes, self._read_whole, on_ready)

    async def _index(self, info: TensorInfo, index: Any) -> np.ndarray:
        eng = self._eng()
        cached = eng.cache.peek(info.name)
        if cached is not None:
            return np.asarray(cached[index])
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        n = info.shape[0] if info.shape else 0
        if not info.shape or not isinstance(first, int | np.integer | slice):
            return np.asarray((await self._get([info.name]))[info.name][index])
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            rows = range(start, stop, step)
            if not rows:
                return np.empty((0, *info.shape[1:]), self._out_dtype(info))[(slice(None), *rest)]
            lo, hi = min(rows), max(rows) + 1
            pick: Any = slice(None, None, step) if step > 0 else np.asarray(rows) - lo
        else:
            i = int(first) + n if int(first) < 0 else int(first)
            if not 0 <= i < n:
                raise IndexError(
                    f"index {int(first)} is out of bounds for {info.name!r} of {n} rows"
                )
            lo, hi, pick = i, i + 1, 0
        nbytes = (hi - lo) * (self._out_nbytes(info) // n)
        async with eng.cache.transient(nbytes):
            (rows_arr,) = await self._read_rows([(info, lo, hi)])
        return np.asarray(rows_arr[(pick, *rest)])

    # -- bulk ----------------------------------------------------------------------------

    def _names(self, names: Iterable[str] | None) -> list[str]:
        wanted = list(self.tensors) if names is None else list(names)
        for n in wanted:
            self[n]  # TensorNotFoundError before any read starts
        return wanted

    async def _load(self, names: list[str], progress: bool | None) -> dict[str, np.ndarray]:
        total = sum(self._out_nbytes(self.tensors[n]) for n in names)
        with _bar(total, progress) as bar:

            def advance(a: np.ndarray) -> None:
                bar.update(a.nbytes)

            return await self._get(names, advance)

    def load(
        self, names: Iterable[str] | None = None, progress: bool | None = None
    ) -> dict[str, np.ndarray]:
        """Read ``names`` (all tensors by default) as name → array, with a bar of bytes."""
        return self._run(self._load(self._names(names), progress))

    async def aload(
        self, names: Iterable[str] | None = None, progress: bool | None = None
    ) -> dict[str, np.ndarray]:
        """``load()`` without blocking the event loop."""
        return await self._arun(self._load(self._names(names), progress))

    def prefetch(self, names: Iterable[str] | None = None) -> None:
        """Warm the cache with ``names``, within its budget (the rest is read and dropped)."""
        self._run(self._prefetch(self._names(names)))

    async def aprefetch(self, names: Iterable[str] | None = None) -> None:
        """``prefetch()`` without blocking the event loop."""
        await self._arun(self._prefetch(self._names(names)))

    async def _prefetch(self, names: list[str]) -> None:
        budget = self._eng().cache.budget
        room = sum(self._out_nbytes(self.tensors[n]) for n in names) if budget is None else budget
        fits: list[str] = []
        for n in names:  # in order, as many as the budget holds
            room -= self._out_nbytes(self.tensors[n])
            if room < 0:
                break
            fits.append(n)
        await self._get(fits)

    # -- layers --------------------------------------------------------------------------

    def layer_names(self, index: int) -> dict[str, str]:
        """Short name (``"self_attn.q_proj.weight"``) → full name, for decoder layer ``index``."""
        return self._layers().get(index, {})

    def _layers(self) -> dict[int, dict[str, str]]:
        layers: dict[int, dict[str, str]] = {}
        for name in self.tensors:
            m = _LAYER.fullmatch(name)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        return dict(sorted(layers.items()))

    def layers(self, prefetch: int = 1) -> Generator[tuple[int, dict[str, np.ndarray]]]:
        """Decoder layers in order as ``(index, short name → array)``, the next ``prefetch``
        already being read while the caller works on the current one."""
        yield from _iterate(_GroupStream(self, list(self._layers().items()), prefetch))

    def alayers(self, prefetch: int = 1) -> AsyncGenerator[tuple[int, dict[str, np.ndarray]]]:
        """``layers()`` as an async iterator. Breaking out early stops the reads it started;
        wrap it in ``contextlib.aclosing()`` for that to happen before the loop is left."""
        return _aiterate(_GroupStream(self, list(self._layers().items()), prefetch))

    def iter_load(
        self, names: Iterable[str] | None = None, progress: bool | None = None
    ) -> Generator[tuple[str, np.ndarray]]:
        """``(name, array)`` in file order, read ahead within the cache's budget, so a caller
        that drops each array walks a checkpoint larger than memory."""
        with (
            self._grouped(names, progress) as (groups, bar),
            contextlib.closing(_iterate(_GroupStream(self, groups, prefetch=2))) as stream,
        ):
            for _, arrays in stream:
                for item in arrays.items():
                    bar.update(item[1].nbytes)
                    yield item

    async def aiter_load(
        self, names: Iterable[str] | None = None, progress: bool | None = None
    ) -> AsyncGenerator[tuple[str, np.ndarray]]:
        """``iter_load()`` as an async iterator."""
        with self._grouped(names, progress) as (groups, bar):
            stream = _aiterate(_GroupStream(self, groups, prefetch=2))
            async with contextlib.aclosing(stream):  # closed with this generator, not later
                async for _, arrays in stream:
                    for item in arrays.items():
                        bar.update(item[1].nbytes)
                        yield item

    @contextlib.contextmanager
    def _grouped(
        self, names: Iterable[str] | None, progress: bool | None
    ) -> Iterator[tuple[list[tuple[int, dict[str, str]]], tqdm[Any]]]:
        """Groups of consecutive names, each a quarter of the budget (three are held or in
        flight at once), and a progress bar of their bytes."""
        wanted = self._names(names)
        sizes = [self._out_nbytes(self.tensors[n]) for n in wanted]
        budget = self._eng().cache.budget or _UNBOUNDED_GROUP_BYTES
        groups: list[tuple[int, dict[str, str]]] = []
        room = 0
        for name, size in zip(wanted, sizes, strict=True):
            if not groups or room < size:
                groups.append((len(groups), {}))
                room = budget // 4
            groups[-1][1][name] = name
            room -= size
        with _bar(sum(sizes), progress) as bar:
            yield groups, bar

    # -- reports -------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Llama structure and every shape checked against the config."""
        return verify(self.config, self.tensors)

    def memory_report(self, largest: int = 5) -> MemoryReport:
        """Parameters, bytes as float16 and as stored, tensor count, the largest tensors."""
        return memory_report(self.tensors, largest)

    def cache_stats(self) -> CacheStats:
        """Hits, misses, evictions, bytes read and resident, of this model's cache."""
        return self._eng().cache.stats()

    def clear_cache(self) -> None:
        """Drop every cached array."""
        self._eng().cache.clear()

    # -- lifetime ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._engine is not None:
            await self._engine.files.aclose()
            self._engine.cache.clear()

    def close(self) -> None:
        """Close files, drop the cache; the background loop stops with the last open model."""
        if self._closed:
            return
        if self._engine is not None and self._engine.rt is _sync.runtime():
            self._run(self._shutdown())
        self._closed = True
        self._engine = None
        _sync.release()

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        if self._closed:
            return
        if self._engine is not None and self._engine.rt is _sync.runtime():
            await self._arun(self._shutdown())
        self._closed = True
        self._engine = None
        await asyncio.get_running_loop().run_in_executor(None, _sync.release)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _GroupStream:
    """Reads groups of tensors in order (decoder layers, say), at most ``prefetch + 1`` groups
    held by it or in flight at any time."""

    def __init__(
        self, model: LazyModel, groups: list[tuple[int, dict[str, str]]], prefetch: int
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, not {prefetch}")
        self.model = model
        self.prefetch = prefetch
        self.groups = groups  # (index, short name → full name)
        self.tasks: deque[asyncio.Task[dict[str, np.ndarray]]] = deque()
        self.next_index = 0
        self.started = 0

    def _top_up(self, limit: int) -> None:
        while len(self.tasks) < limit and self.started < len(self.groups):
            _, names = self.groups[self.started]
            self.tasks.append(asyncio.ensure_future(self.model._get(list(names.values()))))
            self.started += 1

    async def next(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if self.next_index >= len(self.groups):
            return None
        self._top_up(self.prefetch + 1)
        arrays = await self.tasks.popleft()
        index, names = self.groups[self.next_index]
        self.next_index += 1
        self._top_up(self.prefetch)
        return index, {short: arrays[full] for short, full in names.items()}

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


def _iterate(stream: _GroupStream) -> Generator[tuple[int, dict[str, np.ndarray]]]:
    try:
        while (item := stream.model._run(stream.next())) is not None:
            yield item
            del item  # the caller's reference is the only one left
    finally:
        if not stream.model._closed:
            stream.model._run(stream.aclose())


async def _aiterate(stream: _GroupStream) -> AsyncGenerator[tuple[int, dict[str, np.ndarray]]]:
    try:
        while (item := await stream.model._arun(stream.next())) is not None:
            yield item
            del item
    finally:
        # Without ``aclosing()``, an abandoned async generator is closed late, maybe while its
        # loop shuts down and cancels us: the reads are stopped on our loop all the same.
        if not stream.model._closed:
            await _sync.run_detached(stream.aclose())


def _convert(seg: Segment, at: int, raw: memoryview) -> None:
    """Convert bytes ``at`` onwards of a segment into their output (on a worker thread)."""
    t: _Target = seg.target
    size = t.source.bits // 8
    first = (seg.target_start + at) // size
    overflow = convert_into(raw, t.source, t.flat[first : first + len(raw) // size])
    if overflow:
        t.overflow.append(overflow)


def _direct(seg: Segment) -> memoryview | None:
    """The output bytes a segment is read straight into when its dtype is kept as stored."""
    t: _Target = seg.target
    if t.flat.dtype != t.source.numpy:
        return None
    out = memoryview(t.flat.view(np.uint8).data)
    return out[seg.target_start : seg.target_start + seg.nbytes]


def _bar(total: int, progress: bool | None) -> tqdm[Any]:
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="loading",
        disable=not _progress_enabled(progress),
    )


def _tensor_table(checkpoint: Checkpoint, headers: list[Header]) -> dict[str, TensorInfo]:
    """Every tensor by name, in file order; the index, when present, must agree with headers."""
    seen: dict[str, TensorInfo] = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in seen:
                raise HeaderError(
                    f"{where(info.file, name)}tensor also stored in {seen[name].file}"
                )
            seen[name] = info
    if checkpoint.weight_map is None:
        return seen
    table: dict[str, TensorInfo] = {}
    for name, shard in checkpoint.weight_map.items():
        found = seen.get(name)
        if found is None or found.file != str(shard):
            raise CheckpointError(
                f"{where(checkpoint.index or shard, name)}index places the tensor in {shard}, "
                "whose header lacks it"
            )
        table[name] = found
    return dict(sorted(table.items(), key=lambda kv: (kv[1].file, kv[1].offset)))


async def _open_core(path: str | os.PathLike[str], options: dict[str, Any]) -> LazyModel:
    loop = asyncio.get_running_loop()
    rt = _sync.runtime()
    checkpoint = await loop.run_in_executor(rt.executor, discover, Path(path))
    # Every header read runs to its end, so a bad shard leaves nothing running behind it.
    results = await asyncio.gather(
        *(read_header(str(f), rt.executor) for f in checkpoint.files), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    read = [r for r in results if not isinstance(r, BaseException)]
    headers = [header for header, _ in read]
    stamps = {header.file: stamp for header, stamp in read}
    config: LlamaConfig | None = None
    if checkpoint.config.exists() or checkpoint.index is not None or Path(path).is_dir():
        config = await loop.run_in_executor(rt.executor, load_config, checkpoint.config)
    return LazyModel(checkpoint, headers, stamps, config, **options)


def open(
    path: str | os.PathLike[str],
    *,
    dtype: str | np.dtype[Any] | None = "float16",
    cache_bytes: int | str | None = DEFAULT_CACHE_BYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_overflow: OnOverflow = "warn",
) -> LazyModel:
    """Open a checkpoint folder or one ``.safetensors`` file, reading only headers and config."""
    options = dict(
        dtype=dtype, cache_bytes=cache_bytes, concurrency=concurrency, on_overflow=on_overflow
    )
    _sync.retain()  # the runtime stops again if opening fails
    try:
        return _sync.sync(_open_core(path, options))
    finally:
        _sync.release()


async def aopen(
    path: str | os.PathLike[str],
    *,
    dtype: str | np.dtype[Any] | None = "float16",
    cache_bytes: int | str | None = DEFAULT_CACHE_BYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_overflow: OnOverflow = "warn",
) -> LazyModel:
    """``open()`` without blocking the event loop; returns the same kind of object."""
    options = dict(
        dtype=dtype, cache_bytes=cache_bytes, concurrency=concurrency, on_overflow=on_overflow
    )
    _sync.retain()
    try:
        return await _sync.run_async(_open_core(path, options))
    finally:
        _sync.release()
