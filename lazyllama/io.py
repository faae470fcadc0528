"""Async reads of byte ranges: one concurrency limit, one shared handle per file, coalescing.

Files are opened and closed through aiofiles on the worker threads. Ranges that touch are merged
and cut into pieces of a few MiB; each piece is one job on a worker thread, which reads it with
positional reads (so reads never race on a handle's position and share it freely), a block at a
time into that thread's buffer, and hands each block to a sink that converts it while it is still
in the CPU cache. One trip to a worker per piece; reading and converting run on every core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiofiles
from aiofiles.threadpool.binary import AsyncFileIO

from ._sync import settle
from .errors import CheckpointError, HeaderError, ReadError, where
from .format import Header, header_length, parse_header

__all__ = ["CHUNK_BYTES", "FileSet", "Piece", "Range", "Segment", "Stamp", "plan", "read_header"]

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Segment:
    """``nbytes`` of a piece starting at ``start`` (in the piece) belonging to ``target``,
    of which they are bytes ``target_start`` onwards."""

    target: Any
    start: int
    nbytes: int
    target_start: int


@dataclass(slots=True)
class Piece:
    """One contiguous read of a file: at most a chunk, made of one or more segments."""

    file: str
    offset: int
    nbytes: int = 0
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Range:
    """Bytes ``[offset, offset + nbytes)`` of ``file`` wanted for ``target``; cuts fall on
    multiples of ``align`` (the element size) so a segment always holds whole elements."""

    target: Any
    file: str
    offset: int
    nbytes: int
    align: int


def plan(ranges: Iterable[Range], chunk: int = CHUNK_BYTES) -> list[Piece]:
    """Cut ranges into pieces: neighbours in a file merged, large ones split, each ≤ ``chunk``."""
    pieces: list[Piece] = []
    for r in sorted(ranges, key=lambda r: (r.file, r.offset)):
        done = 0
        while done < r.nbytes:
            offset = r.offset + done
            last = pieces[-1] if pieces else None
            joins = last is not None and last.file == r.file and last.offset + last.nbytes == offset
            room = chunk - last.nbytes if last is not None and joins else 0
            n = min(r.nbytes - done, room // r.align * r.align)
            if n == 0:  # not contiguous, or no room for a whole element: a new piece
                last = Piece(r.file, offset)
                pieces.append(last)
                n = min(r.nbytes - done, chunk // r.align * r.align)
            assert last is not None
            last.segments.append(Segment(r.target, last.nbytes, n, done))
            last.nbytes += n
            done += n
    return pieces


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a file looked like when opened; any change means it was replaced or truncated."""

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class FileSet:
    """Read access to a fixed set of files: one concurrency limit, one shared handle per file."""

    def __init__(
        self,
        stamps: dict[str, Stamp],
        executor: concurrent.futures.ThreadPoolExecutor,
        concurrency: int,
        chunk: int = CHUNK_BYTES,
    ) -> None:
        self.stamps = stamps
        self.executor = executor
        self.chunk = chunk
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._handles: dict[str, asyncio.Future[Any]] = {}
        self._users: dict[str, int] = {}
        self.bytes_read = 0
        self.reads = 0

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    def check(self, file: str) -> None:
        """Raise ``ReadError`` when ``file`` is not the file that was opened."""
        try:
            now = Stamp.of(os.stat(file))
        except OSError as e:
            raise ReadError(f"{where(file)}cannot be read any more ({e.strerror})") from None
        if now != self.stamps[file]:
            raise ReadError(
                f"{where(file)}changed since it was opened "
                f"(size {self.stamps[file].size} → {now.size}); open the checkpoint again"
            )

    async def _acquire(self, file: str) -> AsyncFileIO:
        """The file's handle, opened once on first use and shared; at most ``concurrency``
        stay open. The caller gives it back with ``self._users[file] -= 1``."""
        opening = self._handles.get(file)
        if opening is None:
            if len(self._handles) >= self.concurrency:  # close one that no read is using
                idle = next((f for f, h in self._handles.items() if self._idle(f, h)), None)
                if idle is not None:
                    del self._users[idle]
                    await settle(self._handles.pop(idle).result().close())
            opening = asyncio.ensure_future(
                aiofiles.open(file, "rb", buffering=0, executor=self.executor)
            )
            self._handles[file], self._users[file] = opening, 0
        self._users[file] += 1
        try:
            handle = await asyncio.shield(opening)  # one waiter leaving does not stop the rest
        except BaseException as e:
            if self._handles.get(file) is opening:  # not yet forgotten by another waiter
                self._users[file] -= 1
                if isinstance(e, OSError):  # forgotten: a later read tries again
                    del self._handles[file], self._users[file]
            if isinstance(e, OSError):
                raise ReadError(f"{where(file)}cannot be opened ({e.strerror})") from None
            raise
        assert isinstance(handle, AsyncFileIO)
        return handle

    def _idle(self, file: str, opening: asyncio.Future[Any]) -> bool:
        return not self._users[file] and opening.done() and opening.exception() is None

    async def run(
        self,
        pieces: Sequence[Piece],
        sink: Callable[[Segment, int, memoryview], None],
        direct: Callable[[Segment], memoryview | None],
    ) -> None:
        """Read every piece; each runs as one job on a worker thread, which reads it a block
        at a time and calls ``sink(segment, at, block)`` for bytes ``at`` onwards of a segment
        while they are still in the CPU cache. ``direct(segment)`` may instead return the
        segment's final destination, which its bytes are then read straight into."""
        tasks = [asyncio.ensure_future(self._one(p, sink, direct)) for p in pieces]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(
        self,
        piece: Piece,
        sink: Callable[[Segment, int, memoryview], None],
        direct: Callable[[Segment], memoryview | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            handle = await self._acquire(piece.file)
            try:
                job = loop.run_in_executor(
                    self.executor, self._fill, piece, handle.fileno(), sink, direct
                )
                await settle(job)
            finally:
                self._users[piece.file] -= 1
        self.bytes_read += piece.nbytes
        self.reads += 1

    def _fill(
        self,
        piece: Piece,
        fd: int,
        sink: Callable[[Segment, int, memoryview], None],
        direct: Callable[[Segment], memoryview | None],
    ) -> None:
        """Read one piece and hand it on (on a worker thread)."""
        self.check(piece.file)
        for seg in piece.segments:
            offset = piece.offset + seg.start
            dest = direct(seg)
            if dest is not None:
                _pread(fd, piece.file, dest, offset)
                continue
            block = _block()
            for at in range(0, seg.nbytes, len(block)):
                view = block[: min(len(block), seg.nbytes - at)]
                _pread(fd, piece.file, view, offset + at)
                sink(seg, at, view)

    async def aclose(self) -> None:
        while self._handles:
            _, opening = self._handles.popitem()
            with contextlib.suppress(Exception):
                await settle(asyncio.shield(opening))
                await settle(opening.result().close())
        self._users.clear()


BLOCK_BYTES = 1 << 20  # read and converted at a time by one thread: stays in its CPU cache
_local = threading.local()


def _block() -> memoryview:
    """This thread's block buffer."""
    block: memoryview | None = getattr(_local, "block", None)
    if block is None:
        block = _local.block = memoryview(bytearray(BLOCK_BYTES))
    return block


_seek_lock = threading.Lock()


def _pread(fd: int, file: str, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of ``file`` (open as ``fd``) at ``offset``, or raise
    ``ReadError``. Positional, so any number of threads share one descriptor."""
    got = 0
    try:
        while got < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[got:]], offset + got)
            else:  # no positional read on this system (Windows): seek and read, one at a time
                with _seek_lock:
                    os.lseek(fd, offset + got, os.SEEK_SET)
                    data = os.read(fd, len(view) - got)
                n = len(data)
                view[got : got + n] = data
            if not n:
                raise ReadError(
                    f"{where(file)}short read: {got} of {len(view)} bytes at offset {offset}"
                    " (file truncated?)"
                )
            got += n
    except OSError as e:
        if isinstance(e, ReadError):
            raise
        raise ReadError(f"{where(file)}read failed at offset {offset}: {e}") from e


async def read_header(file: str, executor: concurrent.futures.Executor) -> tuple[Header, Stamp]:
    """Read and validate one file's header (its length prefix, then the JSON, nothing more),
    with the stamp of the file as it was read, against which later reads are checked."""
    try:
        st = await asyncio.get_running_loop().run_in_executor(executor, os.stat, file)
        async with aiofiles.open(file, "rb", buffering=0, executor=executor) as f:
            n = header_length(await f.read(8), file, st.st_size)
            raw = await f.read(n)
    except OSError as e:
        raise CheckpointError(f"{where(file)}cannot be read ({e.strerror})") from None
    if len(raw) != n:
        raise HeaderError(f"{where(file)}file ended inside its {n}-byte header")
    return parse_header(raw, file, st.st_size), Stamp.of(st)
