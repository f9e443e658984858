"""The event loop of a worker process: where it runs, and how a run is handed to it.

A process that runs one task at a time in its main thread (a prefork child, a solo worker)
runs the loop right there, for the length of each run; any other process runs it in a real
OS thread of its own, which the pool's threads or greenlets hand their runs to
(docs/internals.md#monkey-patched-threads). :meth:`Runtime.run` is the one way in, with
those two strategies side by side; ``_limits`` holds the time limits it applies.

:func:`get_runtime` starts the loop lazily, at the first run in a process (a prefork parent
never starts one), keyed by ``os.getpid()``: a forked child sees its parent's loop object
claim to be running, without the thread behind it (docs/internals.md#fork). A loop thread
that dies is replaced. :func:`shutdown` runs the stop hooks on the loop (engines are
disposed there), then stops and closes it; it is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import Context, copy_context
from dataclasses import dataclass, field
from typing import Any, TypeVar

from billiard.exceptions import TimeLimitExceeded

from . import _config, _limits, _process, _watchdog
from ._crossing import Crossing
from ._limits import CANCELLED_RUN_GRACE
from ._waiters import LockWaiter, hold_hub, original, waiter_class

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds :func:`shutdown` waits for the stop hooks and for the loop thread.
SHUTDOWN_GRACE = 10.0


@dataclass
class Hooks:
    """What the package runs on every loop it starts, set once at import by ``_worker``:
    the loop layer knows nothing of runs or sessions."""

    #: The loop's task factory.
    task_factory: Any = None
    #: What holds the loop, for the stall watchdog's warning (``_watchdog.Holder``).
    holder: _watchdog.Holder | None = None
    #: Awaited on the loop, in order, before it stops.
    stopping: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: Called when a loop was lost (its thread died): what lived on it is unusable.
    lost: list[Callable[[], None]] = field(default_factory=list)

    async def stop(self) -> None:
        for hook in self.stopping:  # each runs, whatever the one before did
            try:
                await hook()
            except Exception:
                logger.exception("Stopping the event loop: %r failed", hook)


hooks = Hooks()


class Runtime:
    """The event loop of this process and the thread that runs it (or not: ``inline``)."""

    loop: asyncio.AbstractEventLoop

    def __init__(self, stall_threshold: float) -> None:
        self.pid = os.getpid()
        self.closed = False
        self.alive = True
        self.inline, self.pool_enforces_limits = _process.loop_placement()
        self._stopped = LockWaiter()
        self._new_waiter = waiter_class()
        self._current: Crossing | None = None  # inline: the run in progress
        self._waiting: set[Crossing] = set()  # the runs handed to the loop thread
        if self.inline:
            self.loop = asyncio.new_event_loop()
            self.loop.set_task_factory(hooks.task_factory)
            if self.pool_enforces_limits:
                _limits.catch_soft_limit(lambda: self._current)
        else:
            started = LockWaiter()
            original("_thread", "start_new_thread")(self._serve, (started,))
            started.wait()
        _watchdog.watch(self.loop, stall_threshold, hooks.holder)

    def _serve(self, started: LockWaiter) -> None:
        # Made in its own thread: under gevent the selector belongs to this thread's hub.
        self.loop = asyncio.new_event_loop()
        self.loop.set_task_factory(hooks.task_factory)
        asyncio.set_event_loop(self.loop)
        hub = hold_hub()  # noqa: F841  # kept alive for as long as the loop runs
        started.notify()
        try:
            self.loop.run_forever()
        except BaseException:
            logger.exception("The event loop thread of process %d failed.", self.pid)
        finally:
            if not self.closed:
                self._lose()
            self._stopped.notify()

    def _lose(self) -> None:
        self.alive = False
        logger.error(
            "The event loop thread of process %d stopped unexpectedly; the runs waiting on "
            "it fail, and the next run starts a new loop.",
            self.pid,
        )
        for crossing in list(self._waiting):
            crossing.abandon(RuntimeError("The event loop running this task stopped."))
        for hook in hooks.lost:
            hook()

    def on_loop(self) -> bool:
        """True in the loop's own thread, where blocking on the loop would deadlock."""
        return asyncio._get_running_loop() is self.loop

    def run(
        self, coro: Coroutine[Any, Any, T], *, holder: Any = None, soft: float | None = None,
        hard: float | None = None, name: str = "task",
    ) -> T:  # fmt: skip
        """Run ``coro`` on the loop in a copy of the caller's context; block (cooperatively)
        for its result. The one way in: inline, or handed to the loop thread.

        ``holder.crossing`` (if a holder is given) is set to the run's :class:`Crossing`
        before ``coro`` starts, for the functions it hands back to the caller. ``soft`` and
        ``hard`` are the run's time limits in seconds, applied here unless the pool enforces
        them (a prefork child), as ``_limits`` describes.
        """
        if self.on_loop():
            coro.close()
            raise RuntimeError(
                f"{name}: a blocking call was made on the event loop thread, outside a task "
                "body: await the coroutine instead, or call the task from a task body."
            )
        if self.inline and asyncio._get_running_loop() is not None:
            coro.close()
            raise RuntimeError(
                f"{name}: an async task body was called from inside another running event "
                "loop in a worker process that runs its loop inline; await it from that "
                "loop's code instead."
            )
        crossing = Crossing(self.loop, None if self.inline else self._new_waiter())
        if holder is not None:
            holder.crossing = crossing
        if self.pool_enforces_limits:
            soft = hard = None
        if soft is not None:
            coro = _limits.within_soft_limit(coro, soft)
        context = copy_context()
        if self.inline:
            return self._run_inline(crossing, coro, context, hard, name)
        return self._run_in_loop_thread(crossing, coro, context, hard, name)

    def _run_inline(
        self, crossing: Crossing, coro: Coroutine[Any, Any, T], context: Context,
        hard: float | None, name: str,
    ) -> T:  # fmt: skip
        """The caller's thread runs the loop until the run ends."""
        self._current = crossing
        crossing.start(coro, context)
        timers: list[asyncio.TimerHandle] = []
        if hard is not None:
            timers.append(self.loop.call_later(hard, self._expire, hard, timers))
        try:
            self.loop.run_forever()  # until the crossing stops it, as its coroutine ends
            if not crossing.done:
                if crossing.cancelled is None:
                    raise RuntimeError("Event loop stopped before the task body completed.")
                _limits.still_running(name)
        except BaseException as exc:  # interrupted from outside the body
            if not crossing.done:
                crossing.cancel(exc)
                timers.append(self.loop.call_later(CANCELLED_RUN_GRACE, self.loop.stop))
                self.loop.run_forever()
                if not crossing.done:
                    _limits.still_running(name)
            raise
        finally:
            self._current = None
            for timer in timers:
                timer.cancel()
        result: T = _limits.outcome(crossing)
        return result

    def _run_in_loop_thread(
        self, crossing: Crossing, coro: Coroutine[Any, Any, T], context: Context,
        hard: float | None, name: str,
    ) -> T:  # fmt: skip
        """The caller waits (cooperatively) while the loop thread runs it."""
        self._waiting.add(crossing)
        self.loop.call_soon_threadsafe(crossing.start, coro, context)
        try:
            if not crossing.wait(hard):
                self._cancel(crossing, TimeLimitExceeded(hard), name)
        except BaseException as exc:
            self._cancel(crossing, exc, name)
            raise
        finally:
            self._waiting.discard(crossing)
            crossing.close()
        result: T = _limits.outcome(crossing)
        return result

    def _cancel(self, crossing: Crossing, reason: BaseException, name: str) -> None:
        self.loop.call_soon_threadsafe(crossing.cancel, reason)
        if not crossing.wait(CANCELLED_RUN_GRACE):
            _limits.still_running(name)

    def _expire(self, hard: float, timers: list[asyncio.TimerHandle]) -> None:
        crossing = self._current
        if crossing is not None and not crossing.done:
            crossing.cancel(TimeLimitExceeded(hard))
            timers.append(self.loop.call_later(CANCELLED_RUN_GRACE, self.loop.stop))

    def close(self) -> None:
        """Run the stop hooks on the loop, stop it, close it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _watchdog.unwatch(self.loop)
        if self.inline:
            if not self.loop.is_running():
                self.loop.run_until_complete(hooks.stop())
                self.loop.close()
            return
        if not self.alive:
            return
        # A blocking wait is right here: the worker is going away.
        crossing = Crossing(self.loop, LockWaiter())
        self.loop.call_soon_threadsafe(crossing.start, hooks.stop(), Context())
        if not crossing.wait(SHUTDOWN_GRACE):
            logger.warning("The loop's stop hooks did not end within %.0f s.", SHUTDOWN_GRACE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._stopped.wait(SHUTDOWN_GRACE):
            self.loop.close()


_runtime: Runtime | None = None
# Guards the slow path only: the first start in a process.
_lock = threading.Lock()


def _usable(runtime: Runtime | None) -> bool:
    return (
        runtime is not None and runtime.pid == os.getpid() and not runtime.closed and runtime.alive
    )


def get_runtime(app: Any = None) -> Runtime:
    """The runtime of this process, started on first use (after a fork or a lost loop: a
    new one), with the stall threshold of ``app``, the app whose run starts it."""
    global _runtime
    runtime = _runtime
    if not _usable(runtime):
        with _lock:
            runtime = _runtime
            if not _usable(runtime):
                conf = {} if app is None else app.conf
                runtime = _runtime = Runtime(_config.stall_threshold(conf))
    assert runtime is not None
    return runtime


def current() -> Runtime | None:
    """The running runtime of this process, without starting one."""
    runtime = _runtime
    return runtime if _usable(runtime) else None


def shutdown() -> None:
    """Close this process's runtime, if it started one. Safe to call more than once."""
    runtime = current()
    if runtime is not None:
        runtime.close()
