"""Async reads of byte ranges over aiofiles: shared concurrency, reused handles, coalescing.

aiofiles has no positional read, so each read takes a handle of its own from a per-file pool,
seeks and reads; no two reads ever share a handle's position. Ranges that touch are merged and
cut into chunks of a few MiB, each read into a reusable buffer and handed to a ``sink`` that runs
on a worker thread, so reading and converting overlap and use every core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
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
    """Read access to a fixed set of files: one concurrency limit, pooled handles, buffers."""

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
        self._idle: dict[str, list[AsyncFileIO]] = {}
        self._open = 0
        self._buffers: list[bytearray] = []
        self.bytes_read = 0
        self.reads = 0

    @property
    def open_handles(self) -> int:
        return self._open

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

    async def _handle(self, file: str) -> AsyncFileIO:
        idle = self._idle.setdefault(file, [])
        if idle:
            return idle.pop()
        if self._open >= self.concurrency:  # bounded: close an idle handle of another file
            for handles in self._idle.values():
                if handles:
                    await settle(handles.pop().close())
                    self._open -= 1
                    break
        opening = asyncio.ensure_future(
            aiofiles.open(file, "rb", buffering=0, executor=self.executor)
        )
        try:
            handle = await settle(opening)
        except OSError as e:
            raise ReadError(f"{where(file)}cannot be opened ({e.strerror})") from None
        except asyncio.CancelledError:
            if not opening.cancelled() and opening.exception() is None:
                self._open += 1  # opened all the same: pooled, closed with the rest
                self._idle[file].append(opening.result())
            raise
        self._open += 1
        assert isinstance(handle, AsyncFileIO)
        return handle

    async def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``file`` at ``offset``, or raise ``ReadError``."""
        self.check(file)
        handle = await self._handle(file)
        ok = False
        try:
            await settle(handle.seek(offset))
            got = 0
            while got < len(buf):
                n = await settle(handle.readinto(buf[got:]))
                if not n:
                    raise ReadError(
                        f"{where(file)}short read: {got} of {len(buf)} bytes at offset {offset}"
                        " (file truncated?)"
                    )
                got += n
            ok = True
        except OSError as e:
            if isinstance(e, ReadError):
                raise
            raise ReadError(f"{where(file)}read failed at offset {offset}: {e}") from e
        finally:
            if ok:
                self._idle[file].append(handle)
            else:  # state unknown after an error or a cancellation: drop it
                self._open -= 1
                await settle(handle.close())
        self.bytes_read += len(buf)
        self.reads += 1

    async def run(
        self,
        pieces: Sequence[Piece],
        sink: Callable[[Piece, memoryview], None],
        direct: Callable[[Piece], tuple[memoryview, bool] | None],
    ) -> None:
        """Read every piece, then call ``sink(piece, bytes)`` on a worker thread.

        ``direct(piece)`` may return the final destination of a piece's bytes, and whether
        the sink must still convert them there (in place); else they go through a buffer.
        """
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
        sink: Callable[[Piece, memoryview], None],
        direct: Callable[[Piece], tuple[memoryview, bool] | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            landing = direct(piece)
            if landing is not None:
                view, convert = landing
                await self.read_into(piece.file, piece.offset, view)
                if convert:
                    await settle(loop.run_in_executor(self.executor, sink, piece, view))
                return
            buf = self._buffers.pop() if self._buffers else bytearray(self.chunk)
            try:
                view = memoryview(buf)[: piece.nbytes]
                await self.read_into(piece.file, piece.offset, view)
                await settle(loop.run_in_executor(self.executor, sink, piece, view))
            finally:
                self._buffers.append(buf)

    async def aclose(self) -> None:
        for handles in self._idle.values():
            while handles:
                await settle(handles.pop().close())
                self._open -= 1
        self._buffers.clear()


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
