"""How a worker's thread or greenlet sleeps until the loop thread says a run is done; and,
the other way, how a thread's answer settles a future of the loop (:func:`settle`).

The loop always runs in a real OS thread; what differs is the caller:

* OS threads (prefork, solo, threads): a plain lock, released by the loop thread.
  Acquiring it is interruptible by signal handlers, so prefork's soft time limit (SIGUSR1)
  still reaches a main thread that is waiting.
* gevent: an ``async_`` watcher of the caller's hub, which the loop thread may ``send()``
  to from outside; the greenlet waits on an Event and the hub keeps serving other
  greenlets. ``future.result()`` or ``AsyncResult`` there fail with ``LoopExit``
  (docs/internals.md#gevent-loop-thread).
* eventlet: no thread-safe hub wake-up exists, and a native wait in a greenthread fails with
  "Cannot switch to a different thread" (docs/internals.md#eventlet-wait). The loop thread
  writes a byte to a pipe; one dispatcher greenthread, woken by the hub's own fd polling,
  wakes the waiters.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
from typing import Any, Protocol


class Waiter(Protocol):
    """A wake-up the loop thread can give a worker thread or greenlet, any number of times."""

    def notify(self) -> None:
        """Called from the loop thread; wakes the waiter (several calls may merge into one)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block the caller (cooperatively) until notified; False on timeout."""

    def close(self) -> None:
        """Called by the caller when it stops waiting; later notifications are dropped."""


def original(module: str, name: str) -> Any:
    """The unpatched primitive, even when gevent or eventlet monkey-patched it
    (docs/internals.md#monkey-patched-threads)."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        return monkey.get_original(module, name)
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        return getattr(patcher.original(module), name)
    return getattr(__import__(module), name)


class LockWaiter:
    """A binary semaphore: only the loop thread releases it, only the caller acquires it."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = original("_thread", "allocate_lock")()
        self._lock.acquire()

    def notify(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._lock.acquire(timeout=-1 if timeout is None else timeout))

    def close(self) -> None:
        pass


class GeventWaiter:
    """Only ``send()`` of a gevent watcher may be called from another thread: the caller
    closes the watcher in its own thread when it stops waiting, and the lock keeps a late
    ``notify()`` off a closed one. (Left to garbage collection, watchers piled up on the
    caller's hub between collections, and were closed by whichever thread collected them.)
    """

    __slots__ = ("_event", "_lock", "_watcher")

    def __init__(self) -> None:
        import gevent
        from gevent.event import Event

        self._event = Event()
        self._lock = original("_thread", "allocate_lock")()
        self._watcher: Any = gevent.get_hub().loop.async_()
        self._watcher.start(self._event.set)

    def notify(self) -> None:
        with self._lock:
            if self._watcher is not None:
                self._watcher.send()

    def wait(self, timeout: float | None = None) -> bool:
        woken = bool(self._event.wait(timeout))
        self._event.clear()  # before the caller looks at what changed: no wake-up is lost
        return woken

    def close(self) -> None:
        with self._lock:
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()


class _EventletWakeups:
    """One pipe per process; its dispatcher greenthread wakes the waiters the loop named."""

    def __init__(self) -> None:
        import eventlet

        self._read, self._write = original("os", "pipe")()
        os.set_blocking(self._read, False)
        self._pending: collections.deque[Any] = collections.deque()  # appends are thread-safe
        self._os_write = original("os", "write")
        eventlet.spawn(self._dispatch)

    def wake(self, queue: Any) -> None:  # on the loop thread
        self._pending.append(queue)
        self._os_write(self._write, b"\0")

    def _dispatch(self) -> None:
        from eventlet.hubs import trampoline

        while True:
            trampoline(self._read, read=True)
            try:
                os.read(self._read, 4096)
            except BlockingIOError:
                continue
            while self._pending:
                self._pending.popleft().put(None)


_eventlet_wakeups: _EventletWakeups | None = None


class EventletWaiter:
    __slots__ = ("_queue", "_wakeups")

    def __init__(self) -> None:
        from eventlet.queue import LightQueue

        global _eventlet_wakeups
        if _eventlet_wakeups is None:
            _eventlet_wakeups = _EventletWakeups()
        self._wakeups = _eventlet_wakeups
        self._queue = LightQueue()

    def notify(self) -> None:
        self._wakeups.wake(self._queue)

    def wait(self, timeout: float | None = None) -> bool:
        from eventlet.queue import Empty

        try:
            self._queue.get(timeout=timeout)
        except Empty:
            return False
        while not self._queue.empty():
            self._queue.get_nowait()
        return True

    def close(self) -> None:
        pass


def hold_hub() -> Any:
    """In the loop thread under gevent: keep that thread's hub from ending.

    The patched selector waits on the thread's own gevent hub, which raises ``LoopExit``
    ("This operation would block forever") once the asyncio loop is idle with no timer,
    since the watchers it registers do not count. An open, referenced ``async_`` watcher
    keeps the hub waiting. Returns what must be kept alive (None without gevent).
    """
    if waiter_class() is not GeventWaiter:
        return None
    import gevent

    watcher = gevent.get_hub().loop.async_()
    watcher.start(lambda: None)
    return watcher


def waiter_class() -> type[Waiter]:
    """The waiter for this process, by what monkey-patched ``threading`` (if anything)."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            return GeventWaiter
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched("thread"):
            return EventletWaiter
    return LockWaiter


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """On the future's loop (``call_soon_threadsafe``): set what another thread answered,
    unless the waiter gave up (the future is done: cancelled, or timed out)."""
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
