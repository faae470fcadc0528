"""A byte-bounded LRU of arrays with single-flight reads and a budget that counts reads in flight.

The budget bounds what the library holds: cached arrays plus arrays being read, plus the memory
of evicted arrays kept for the next read of the same size. Arrays a caller keeps stay alive while
the caller holds them, cached or not. A key is read once however many callers want it at the same
time; a read nobody waits for any more is cancelled.

Memory is recycled because the first write to fresh memory costs the kernel more than reading and
converting the bytes that fill it: a model streamed layer by layer reads arrays of the same few
sizes again and again. Large arrays get memory of their own (an anonymous mapping), so the cache
can tell, when it evicts one, whether anything else still refers to it; only then is it kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import mmap
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._sync import settle

__all__ = ["RECYCLE_BYTES", "Cache", "CacheStats"]

RECYCLE_BYTES = 1 << 20  # arrays from this size up get memory the cache can recycle
_VICTIMS = 16  # least recently used entries looked at for one of the size a read needs

Reader = Callable[[list[str]], Awaitable[dict[str, np.ndarray]]]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a model's cache; bytes are of arrays as returned (float16 by default)."""

    hits: int
    misses: int
    evictions: int
    bytes_read: int
    resident_bytes: int
    in_flight_bytes: int
    peak_resident_bytes: int
    uncached_oversize: int
    budget_bytes: int | None
    spare_bytes: int  # memory of evicted arrays, kept (within the budget) for the next read
    recycled: int  # reads that landed in such memory instead of fresh memory


class _Flight:
    """One background read of some keys, and how many callers still wait for it."""

    __slots__ = ("futures", "reserved", "task", "waiters")

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[np.ndarray]] = {}
        self.reserved: dict[str, int] = {}  # bytes reserved for keys not yet stored
        self.task: asyncio.Task[None] | None = None
        self.waiters = 0


class Cache:
    """LRU by bytes; ``budget=None`` is unbounded, ``budget=0`` caches nothing."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._resident = 0
        self._reserved = 0
        self._spare: dict[int, list[mmap.mmap]] = {}  # by size: evicted, nobody else holds it
        self._spare_bytes = 0
        self._pinned: dict[int, list[mmap.mmap]] = {}  # spare memory promised to a reservation
        self._peak = 0
        self._hits = self._misses = self._evictions = self._bytes_read = self._oversize = 0
        self._recycled = 0
        self._freed = asyncio.Condition()

    # -- accounting ------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        return CacheStats(
            self._hits,
            self._misses,
            self._evictions,
            self._bytes_read,
            self._resident,
            self._reserved,
            self._peak,
            self._oversize,
            self.budget,
            self._spare_bytes,
            self._recycled,
        )

    def check(self) -> None:
        """Assert the books balance: resident bytes are the entries' bytes, spare bytes the
        spare memory's, and all they hold within budget."""
        assert self._resident == sum(a.nbytes for a in self._entries.values())
        assert self._spare_bytes == sum(len(m) for ms in self._spare.values() for m in ms)
        assert self.budget in (None, 0) or self._held() <= self.budget

    def _held(self) -> int:
        return self._resident + self._reserved + self._spare_bytes

    def _fits(self, nbytes: int) -> bool:
        return self.budget is None or self._held() + nbytes <= self.budget

    def _bounded(self, nbytes: int) -> bool:
        """Whether a read of ``nbytes`` is held to the budget (not unbounded, off, or oversize)."""
        return bool(self.budget) and nbytes <= (self.budget or 0)

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self._held())

    async def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` fit in the budget, making room as ``try_reserve`` does."""
        if not self._bounded(nbytes):
            return
        async with self._freed:
            while not self.try_reserve(nbytes):
                await self._freed.wait()

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve without waiting: spare memory of that size is promised to the read; else
        room is made by letting spare memory of other sizes go, then by evicting entries.
        False when that is not enough (``reserve`` then waits for reads to end)."""
        if not self._bounded(nbytes):
            return True
        while not self._pin(nbytes) and not self._fits(nbytes):
            if self._spare:
                self._take_spare(next(iter(self._spare)))  # the memory goes back to the system
            elif self._entries:
                self._evict_one(self._victim(nbytes))
            else:
                return False
        self._reserved += nbytes
        self._note_peak()
        return True

    def _pin(self, nbytes: int) -> bool:
        """Promise spare memory of ``nbytes`` to the read being reserved, if there is some."""
        if nbytes not in self._spare:
            return False
        self._pinned.setdefault(nbytes, []).append(self._take_spare(nbytes))
        return True

    def _take_spare(self, nbytes: int) -> mmap.mmap:
        """One piece of spare memory of ``nbytes`` (there is one), out of the spare books."""
        spares = self._spare[nbytes]
        memory = spares.pop()
        if not spares:
            del self._spare[nbytes]
        self._spare_bytes -= nbytes
        return memory

    def unreserve(self, nbytes: int, failed: bool = False) -> None:
        """Give back a reservation; ``failed``: its read may not have used the spare memory
        promised to it, which then goes (so no promise outlives the reservations)."""
        if self._bounded(nbytes):
            self._reserved -= nbytes
            if failed and self._pinned.get(nbytes):
                self._pinned[nbytes].pop()
            asyncio.get_running_loop().create_task(self._notify())

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """An array to read into: large ones in memory the cache can recycle once evicted."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < RECYCLE_BYTES or not self._bounded(nbytes) or _ALONE is None:
            return np.empty(shape, dtype)
        pinned = self._pinned.get(nbytes)
        if pinned:
            memory = pinned.pop()
            self._recycled += 1
        else:
            memory = _new_mapping(nbytes)
        return _on(memory, shape, dtype)

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    def _victim(self, nbytes: int) -> str:
        """The entry to evict to make room for ``nbytes``: the least recently used, unless one
        of the few next to it has that very size, whose memory the new read can then take.
        A model streamed layer by layer evicts the oldest layer's copy of the tensor it reads."""
        if nbytes >= RECYCLE_BYTES and _ALONE is not None:
            for key, arr in itertools.islice(self._entries.items(), _VICTIMS):
                if arr.nbytes == nbytes:
                    return key
        return next(iter(self._entries))

    def _evict_one(self, key: str) -> None:
        arr = self._entries.pop(key)
        self._resident -= arr.nbytes
        self._evictions += 1
        memory = _mapping(arr)
        if memory is not None and _holders(arr) == _ALONE:  # nobody else: kept for a next read
            self._spare.setdefault(arr.nbytes, []).append(memory)
            self._spare_bytes += arr.nbytes

    def _store(self, key: str, arr: np.ndarray, reserved: int) -> None:
        """Keep a freshly read array, turning the bytes reserved for it into resident ones."""
        self._bytes_read += arr.nbytes
        self.unreserve(reserved)
        if self.budget == 0:
            return
        if self.budget is not None and arr.nbytes > self.budget:
            self._oversize += 1
            return
        arr.flags.writeable = False  # the cached copy is shared: nobody may change it
        self._entries[key] = arr
        self._resident += arr.nbytes
        self._note_peak()

    @contextlib.asynccontextmanager
    async def transient(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of budget for a read whose result is not cached (rows of a tensor)."""
        await self.reserve(nbytes)
        failed = True
        try:
            yield
            self._bytes_read += nbytes
            failed = False
        finally:
            self.unreserve(nbytes, failed)

    def clear(self) -> None:
        self._entries.clear()
        self._resident = 0
        self._spare.clear()
        self._spare_bytes = 0

    def peek(self, key: str) -> np.ndarray | None:
        """A cached array, counted as a hit, or None (not counted)."""
        arr = self._entries.get(key)
        if arr is not None:
            self._entries.move_to_end(key)
            self._hits += 1
        return arr

    # -- single-flight reads ---------------------------------------------------------------

    async def get_many(
        self,
        keys: Sequence[str],
        sizes: dict[str, int],
        read: Reader,
        on_ready: Callable[[np.ndarray], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Arrays for ``keys``: cached ones at once, the rest read once in the background.

        ``sizes`` gives each key's array size in bytes; ``read`` reads a batch of keys;
        ``on_ready`` is called with each array as it becomes available.
        Keys to read are batched in the order given, a batch going out as soon as the budget
        has no room for its next key, so reading stays pipelined under a small budget.
        """
        out: dict[str, np.ndarray] = {}
        waits: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        flights: list[_Flight] = []
        mine = _Flight()
        loop = asyncio.get_running_loop()
        for key in dict.fromkeys(keys):
            arr = self.peek(key)
            if arr is not None:
                out[key] = arr
                if on_ready is not None:
                    on_ready(arr)
                continue
            flight = self._flights.get(key)
            if flight is None:
                self._misses += 1
                flight = self._flights[key] = mine
                mine.futures[key] = loop.create_future()
            if flight not in flights:
                flights.append(flight)
            waits.append((key, flight.futures[key]))
        if mine.futures:
            mine.task = loop.create_task(self._fly(mine, sizes, read))
            mine.task.add_done_callback(functools.partial(self._land, mine))
        for flight in flights:
            flight.waiters += 1
        try:
            for key, fut in waits:
                out[key] = await asyncio.shield(fut)
                if on_ready is not None:
                    on_ready(out[key])
        except BaseException:
            doomed = []
            for flight in flights:  # cancelled or failed: stop reads nobody else wants
                flight.waiters -= 1
                if flight.waiters == 0 and flight.task is not None and not flight.task.done():
                    flight.task.cancel()
                    doomed.append(flight.task)
                    self._land(flight, None)  # a newcomer must start afresh, not join it
            if doomed:  # and let them unwind, so no read outlives the caller
                await asyncio.wait(doomed)
            raise
        for flight in flights:
            flight.waiters -= 1
        return {k: out[k] for k in keys}

    async def _fly(self, flight: _Flight, sizes: dict[str, int], read: Reader) -> None:
        reads: list[asyncio.Task[None]] = []
        batch: list[str] = []
        try:
            for key in flight.futures:
                if not self.try_reserve(sizes[key]):
                    if batch:
                        reads.append(asyncio.create_task(self._read(flight, batch, read)))
                        batch = []
                    await self.reserve(sizes[key])
                flight.reserved[key] = sizes[key]
                batch.append(key)
            if batch:
                reads.append(asyncio.create_task(self._read(flight, batch, read)))
            await asyncio.gather(*reads)
        except Exception as e:
            for fut in flight.futures.values():
                if not fut.done():
                    fut.set_exception(e)
                    fut.exception()  # retrieved here, so no "never retrieved" warning
        finally:
            for task in reads:
                task.cancel()
            try:  # even if cancelled meanwhile, the reads stop before their bytes are given back
                await settle(asyncio.gather(*reads, return_exceptions=True))
            finally:
                for nbytes in flight.reserved.values():  # reserved, never stored
                    self.unreserve(nbytes, failed=True)
                flight.reserved.clear()

    def _land(self, flight: _Flight, _: object) -> None:
        """When a flight ends however it ends (even cancelled before it ran): whatever it did
        not deliver is cancelled and forgotten, so a later request reads again."""
        for key, fut in flight.futures.items():
            if not fut.done():
                fut.cancel()
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def _read(self, flight: _Flight, keys: list[str], read: Reader) -> None:
        arrays = await read(keys)
        for key in keys:
            arr = arrays[key]
            self._store(key, arr, flight.reserved.pop(key))
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.futures[key].done():  # not abandoned meanwhile
                flight.futures[key].set_result(arr)


# -- memory that can be recycled -----------------------------------------------------------------
#
# An array from ``empty`` is a view of a view of an anonymous mapping: ``arr.base`` is the
# ``frombuffer`` array, whose ``base`` is a memoryview of the mapping. numpy points every further
# view (a slice, a transpose, ``np.asarray`` of one) at that ``frombuffer`` array, and anything
# that borrows the memory (a memoryview, a torch tensor) holds the array itself. So when the
# references to both are just the cache's own, nothing else can touch the memory.


def _new_mapping(nbytes: int) -> mmap.mmap:
    memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its large arrays
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def _on(memory: mmap.mmap, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    return np.frombuffer(memory, np.uint8).view(dtype).reshape(shape)


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The mapping under an array from ``empty``, or None for any other array."""
    view = getattr(arr.base, "base", None)
    return view.obj if isinstance(view, memoryview) and isinstance(view.obj, mmap.mmap) else None


def _holders(arr: np.ndarray) -> tuple[int, int]:
    """References to an array from ``empty`` and to the array its views point at."""
    raw = arr.base
    return sys.getrefcount(arr), sys.getrefcount(raw)


def _alone() -> tuple[int, int] | None:
    """What ``_holders`` says of an array only its caller's local name refers to, measured
    the way eviction asks, so it holds whatever this interpreter counts; None where reference
    counts cannot tell (not CPython, or CPython without the GIL)."""
    gil = getattr(sys, "_is_gil_enabled", None)  # Python 3.13+
    if sys.implementation.name != "cpython" or (gil is not None and not gil()):
        return None
    arr = _on(_new_mapping(mmap.PAGESIZE), (mmap.PAGESIZE // 2,), np.dtype(np.float16))
    return _holders(arr)


_ALONE = _alone()
