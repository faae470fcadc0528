"""A byte-bounded LRU of arrays with single-flight reads and a budget that counts reads in flight.

The budget bounds what the library holds: cached arrays plus arrays being read. Arrays a caller
keeps stay alive while the caller holds them, cached or not. A key is read once however many
callers want it at the same time; a read nobody waits for any more is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._sync import settle

__all__ = ["Cache", "CacheStats"]

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
        self._peak = 0
        self._hits = self._misses = self._evictions = self._bytes_read = self._oversize = 0
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
        )

    def check(self) -> None:
        """Assert the books balance: resident bytes are the entries' bytes, within budget."""
        assert self._resident == sum(a.nbytes for a in self._entries.values())
        assert self.budget in (None, 0) or self._resident + self._reserved <= self.budget

    def _fits(self, nbytes: int) -> bool:
        return self.budget is None or self._resident + self._reserved + nbytes <= self.budget

    def _bounded(self, nbytes: int) -> bool:
        """Whether a read of ``nbytes`` is held to the budget (not unbounded, off, or oversize)."""
        return bool(self.budget) and nbytes <= (self.budget or 0)

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self._resident + self._reserved)

    async def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` fit in the budget, evicting least-recently-used entries."""
        if not self._bounded(nbytes):
            return
        async with self._freed:
            while not self._fits(nbytes):
                if self._entries:
                    self._evict_one()
                else:
                    await self._freed.wait()
            self._reserved += nbytes
            self._note_peak()

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve without waiting; evicts as ``reserve`` does. False when it would wait."""
        if not self._bounded(nbytes):
            return True
        while not self._fits(nbytes) and self._entries:
            self._evict_one()
        if not self._fits(nbytes):
            return False
        self._reserved += nbytes
        self._note_peak()
        return True

    def unreserve(self, nbytes: int) -> None:
        if self._bounded(nbytes):
            self._reserved -= nbytes
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    def _evict_one(self) -> None:
        _, arr = self._entries.popitem(last=False)
        self._resident -= arr.nbytes
        self._evictions += 1

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
        try:
            yield
            self._bytes_read += nbytes
        finally:
            self.unreserve(nbytes)

    def clear(self) -> None:
        self._entries.clear()
        self._resident = 0

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
                    self.unreserve(nbytes)
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
