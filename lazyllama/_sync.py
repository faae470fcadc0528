"""One background event loop on which every read runs, and ``sync()`` to wait on it.

Blocking calls submit their coroutine to this loop and wait, so they work from plain scripts,
from threads whose own loop is running (Jupyter), and from many threads at once. Async calls
await the same loop's work through ``asyncio.wrap_future``, so no lock, semaphore or future is
ever tied to a caller's short-lived loop. Open models hold the loop (and the worker threads that
read and convert) alive; when the last one closes, both stop. After ``fork()`` the child starts
afresh.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "Runtime",
    "release",
    "retain",
    "run_async",
    "run_detached",
    "runtime",
    "settle",
    "sync",
]

T = TypeVar("T")


class Runtime:
    """A running loop on its own thread, with the pool of threads that read and convert."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # One worker per core: reads and conversions release the GIL, and a worker more only
        # adds contention for it (measured: the event loop of an async caller then lags more).
        workers = os.cpu_count() or 1
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, "lazyllama-worker")
        # Arithmetic (the forward pass) gets threads of its own, so reads never queue behind it.
        self.compute = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), "lazyllama-compute")
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, name="lazyllama-loop")
        self.thread.daemon = True
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        here = threading.current_thread()
        if here is not self.thread:
            self.thread.join()
            self.loop.close()
        # Joined unless called from one of them, so no thread outlives the last model.
        for pool in (self.executor, self.compute):
            pool.shutdown(wait=not here.name.startswith("lazyllama-"), cancel_futures=True)


_lock = threading.Lock()
_runtime: Runtime | None = None
_users = 0


def runtime() -> Runtime:
    """The current runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def retain() -> Runtime:
    """Count one more open model keeping the runtime alive."""
    global _users
    rt = runtime()
    with _lock:
        _users += 1
    return rt


def release() -> None:
    """One model fewer; the runtime stops when none is left."""
    global _users, _runtime
    with _lock:
        _users = max(0, _users - 1)
        rt = _runtime if _users == 0 else None
        if rt is not None:
            _runtime = None
    if rt is not None:
        rt.stop()


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and block until it is done."""
    rt = runtime()
    if threading.current_thread() is rt.thread:
        coro.close()
        raise RuntimeError("a blocking lazyllama call was made on lazyllama's own loop")
    future = asyncio.run_coroutine_threadsafe(coro, rt.loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # interrupted while waiting (Ctrl-C): stop the work too
        raise


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on the background loop from any loop, cancellation included."""
    rt = runtime()
    if asyncio.get_running_loop() is rt.loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, rt.loop))


async def run_detached(coro: Coroutine[Any, Any, None]) -> None:
    """Await clean-up run on the background loop; if the waiter is cancelled (its loop shutting
    down, say), the clean-up still runs to the end there."""
    done = asyncio.get_running_loop().create_future()
    work = asyncio.run_coroutine_threadsafe(coro, runtime().loop)

    def settle(_: object) -> None:
        if not done.done():
            done.set_result(None)

    def wake(_: object) -> None:
        with contextlib.suppress(RuntimeError):  # the waiter's loop may be closed by now
            done.get_loop().call_soon_threadsafe(settle, None)

    work.add_done_callback(wake)
    await done


async def settle(aw: Awaitable[T]) -> T:
    """Await work running on a thread; if cancelled, wait for the thread to finish first,
    so the buffer and handle it uses are not handed to anyone else while it still runs."""
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()
        raise


def _after_fork_in_child() -> None:
    # The loop's thread and the workers did not survive the fork; start afresh on next use.
    global _lock, _runtime, _users
    _lock = threading.Lock()
    _runtime, _users = None, 0


os.register_at_fork(after_in_child=_after_fork_in_child)
