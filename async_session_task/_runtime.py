"""One asyncio event loop per worker process, in a real OS thread, and the engines it owns.

Lifecycle: :func:`get_runtime` starts the loop thread lazily, at the first run in a process
(so a prefork parent never starts one), and keys it by ``os.getpid()``: a forked child sees
its parent's loop object claim to be running, but the thread behind it does not exist there
(TRAPS 11). :func:`shutdown` disposes the engines on the loop, then stops and closes it; it
is wired to ``worker_process_shutdown``, ``worker_shutdown`` and ``atexit`` because no one
of them fires for every pool (TRAPS 12), and it is idempotent.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextvars import Context
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from billiard.process import current_process
from celery import signals
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from . import _config, _watchdog
from ._call import Call
from ._session import runs
from ._waiters import LockWaiter, hold_hub, original, waiter_class

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds a cancelled run may take to finish its cleanup before it is reported.
CANCEL_GRACE = 10.0
#: Seconds :func:`shutdown` waits for engines to be disposed.
SHUTDOWN_GRACE = 10.0


class Runtime:
    """The event loop of this process, the thread that runs it, and what lives on it."""

    loop: asyncio.AbstractEventLoop

    def __init__(self, *, inline: bool = False) -> None:
        self.pid = os.getpid()
        self.closed = False
        self.inline = inline
        self._stopped = LockWaiter()
        self.new_waiter = waiter_class()
        # Prefork children enforce time limits themselves (SIGUSR1, then SIGKILL); on
        # every other pool, and in solo, the library enforces them for async bodies.
        self.pool_enforces_limits = current_process().name.startswith("ForkPoolWorker")
        self._engines: dict[tuple[str, str], AsyncEngine] = {}
        self._makers: dict[type[Any], async_sessionmaker[Any]] = {}
        self._foreign: list[AsyncEngine] = []
        self._running: asyncio.Task[Any] | None = None
        self._soft_limit_hit = False
        self._stop_when_done = False
        if inline:
            # One task at a time in this thread (prefork child, solo): run the loop right
            # here, per call, and skip the hop to another thread (issue 4).
            self.loop = asyncio.new_event_loop()
            if self.pool_enforces_limits:
                _catch_soft_limit(self)
        else:
            started = LockWaiter()
            original("_thread", "start_new_thread")(self._serve, (started,))
            started.wait()
        _watchdog.watch(self.loop)  # a warning per loop stall (issue 6)

    def _serve(self, started: LockWaiter) -> None:
        # Made in its own thread: under gevent the selector belongs to this thread's hub.
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        hub = hold_hub()  # noqa: F841  # kept alive for as long as the loop runs
        started.notify()
        try:
            self.loop.run_forever()
        finally:
            self._stopped.notify()

    def on_loop(self) -> bool:
        """True in the loop's own thread, where blocking on the loop would deadlock."""
        return asyncio._get_running_loop() is self.loop

    def call(
        self,
        coro: Coroutine[Any, Any, T],
        context: Context,
        *,
        name: str = "task",
        time_limit: float | None = None,
    ) -> T:
        """Run ``coro`` on the loop in ``context`` and block (cooperatively) for its result.

        If the wait is interrupted (prefork's soft time limit, ``gevent.Timeout``, a killed
        greenlet, ``KeyboardInterrupt``), or lasts longer than ``time_limit`` seconds, the
        coroutine is cancelled at its current await and given :data:`CANCEL_GRACE` seconds
        to finish its cleanup (TRAPS 13, 17). Then the interruption is re-raised, or
        ``TimeLimitExceeded`` raised for ``time_limit``.
        """
        if self.on_loop():
            coro.close()
            raise RuntimeError(
                "A blocking task call was made on the event loop thread: await the coroutine "
                "instead, or call the task from the task body itself."
            )
        if self.inline:
            if asyncio._get_running_loop() is not None:
                coro.close()
                raise RuntimeError(
                    "An async task body was called from inside another running event loop "
                    "in a worker process that runs its loop inline; await it from that "
                    "loop's code instead."
                )
            return self._call_inline(coro, context, name, time_limit)
        waiter = self.new_waiter()
        call = Call(self.loop, coro, context, waiter)
        self.loop.call_soon_threadsafe(call.start)
        try:
            if not call.wait(time_limit):
                raise TimeLimitExceeded(time_limit)
        except BaseException:
            self.loop.call_soon_threadsafe(call.cancel)
            if not call.wait(CANCEL_GRACE):
                logger.warning(
                    "%s: its cancelled body is still running %.0f s later (it ignores "
                    "asyncio.CancelledError); its session stays open until it ends.",
                    name,
                    CANCEL_GRACE,
                )
            raise
        finally:
            waiter.close()
        result: T = call.result()
        return result

    def _call_inline(
        self, coro: Coroutine[Any, Any, T], context: Context, name: str, limit: float | None
    ) -> T:
        task = self._running = self.loop.create_task(self._inline(coro), context=context)
        self._soft_limit_hit = False
        try:
            if limit is None:
                # What run_until_complete(task) does, minus the loop pass that only runs its
                # done callback: the body's own coroutine stops the loop as it ends.
                self._stop_when_done = True
                try:
                    self.loop.run_forever()
                finally:
                    self._stop_when_done = False
                if not task.done():  # something else stopped the loop
                    raise RuntimeError("Event loop stopped before Future completed.")
                # Raised here, as run_until_complete raises it: a body that the soft time
                # limit cancelled ends in SoftTimeLimitExceeded below (TRAPS 13).
                task.result()
            elif not self.loop.run_until_complete(_finished(task, limit)):
                raise TimeLimitExceeded(limit)
        except BaseException:
            if not task.done():  # interrupted from outside the body (TRAPS 13)
                task.cancel()
                if not self.loop.run_until_complete(_finished(task, CANCEL_GRACE)):
                    logger.warning("%s: its cancelled body is still running.", name)
            if self._soft_limit_hit and task.cancelled():
                raise SoftTimeLimitExceeded() from None
            raise
        finally:
            self._running = None
        result: T = task.result()
        return result

    async def _inline(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await coro
        finally:
            # Not while waiting for a limit or a cancelled body: that wait stops by itself.
            if self._stop_when_done:
                self.loop.stop()

    def maker_for(self, task: Any) -> async_sessionmaker[Any]:
        """The session factory of ``task``'s class, resolved once per process."""
        maker = self._makers.get(type(task))
        if maker is None:
            with _lock:
                maker = self._makers.get(type(task))
                if maker is None:
                    maker = self._makers[type(task)] = self._resolve(task)
        return maker

    @contextlib.contextmanager
    def override_makers(
        self, makers: Mapping[type[Any], async_sessionmaker[Any]]
    ) -> Iterator[None]:
        """Within the block, runs of these task classes take their sessions from ``makers``
        (what :func:`async_session_task.testing.rollback_sessions` is built on)."""
        saved = {cls: self._makers.get(cls) for cls in makers}
        self._makers.update(makers)
        try:
            yield
        finally:
            for cls, maker in saved.items():
                if maker is None:
                    self._makers.pop(cls, None)
                else:
                    self._makers[cls] = maker

    def _resolve(self, task: Any) -> async_sessionmaker[Any]:
        settings = _config.Settings.of(task)
        settings.check(task.name)
        if settings.maker is not None:
            maker = _config.resolve_maker(settings, task.name)
            for engine in _config.engines_of(maker):
                if all(engine is not seen for seen in self._foreign):
                    # The app's engine may have connected before this process existed (a
                    # prefork parent) or on another loop: start this process on a new pool
                    # without touching the old connections (TRAPS 11; SQLAlchemy, "Using
                    # Connection Pools with Multiprocessing or os.fork()").
                    engine.sync_engine.dispose(close=False)
                    self._foreign.append(engine)
            return maker
        key = settings.engine_key()
        shared = self._engines.get(key)
        if shared is None:
            shared = self._engines[key] = _config.create_engine(settings)
        options = {**_config.SESSION_DEFAULTS, **settings.session_options}
        return async_sessionmaker(shared, **options)

    def engine_count(self) -> int:
        return len(self._engines) + len(self._foreign)

    def close(self) -> None:
        """Dispose every engine on the loop (TRAPS 24), stop the loop, close it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _watchdog.unwatch(self.loop)
        engines = [*self._engines.values(), *self._foreign]
        if self.inline:
            if not self.loop.is_running():
                self.loop.run_until_complete(_dispose(engines))
                self.loop.close()
            return
        if engines and self.loop.is_running():
            # A blocking wait is right here: the worker is going away.
            call = Call(self.loop, _dispose(engines), Context(), LockWaiter())
            self.loop.call_soon_threadsafe(call.start)
            if not call.wait(SHUTDOWN_GRACE):
                logger.warning("Engines were not disposed within %.0f s.", SHUTDOWN_GRACE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._stopped.wait(SHUTDOWN_GRACE):
            self.loop.close()


async def _finished(task: asyncio.Task[Any], seconds: float) -> bool:
    await asyncio.wait([task], timeout=seconds)
    return task.done()


def _catch_soft_limit(runtime: Runtime) -> None:
    """Prefork child, inline loop: turn the soft time limit into a cancellation.

    billiard's SIGUSR1 handler raises ``SoftTimeLimitExceeded`` wherever the main thread
    is. With the loop running there, that may be inside one of asyncio's callbacks, which
    logs and swallows it (``Handle._run``), or inside the selector, leaving the body pending
    (TRAPS 13). While a body runs, cancel it instead: it sees ``CancelledError`` at its
    current await, its cleanup runs, and then Celery gets ``SoftTimeLimitExceeded``.
    Sync tasks of the same worker keep billiard's handler.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    if not callable(previous):
        return

    def on_soft_limit(signum: int, frame: Any) -> None:
        task = runtime._running
        if task is None or task.done():
            previous(signum, frame)
            return
        runtime._soft_limit_hit = True
        task.cancel()

    signal.signal(signal.SIGUSR1, on_soft_limit)


async def _dispose(engines: list[AsyncEngine]) -> None:
    for engine in engines:
        try:
            await engine.dispose()
        except Exception:
            logger.exception("Disposing %r failed", engine)


_runtime: Runtime | None = None
# Guards the slow paths only: first start in a process, first run of a task class.
_lock = threading.Lock()


#: Set by ``worker_process_init``, sent in prefork children and in a solo worker: processes
#: that run one task at a time, in their main thread (TRAPS 12).
_one_at_a_time_pid: int | None = None


def _mark_one_at_a_time(**_: Any) -> None:
    global _one_at_a_time_pid
    _one_at_a_time_pid = os.getpid()


def get_runtime() -> Runtime:
    """The runtime of this process, started on first use (after a fork: a new one)."""
    global _runtime
    runtime = _runtime
    if runtime is None or runtime.pid != os.getpid() or runtime.closed:
        with _lock:
            runtime = _runtime
            if runtime is None or runtime.pid != os.getpid() or runtime.closed:
                inline = _one_at_a_time_pid == os.getpid() and (
                    threading.current_thread() is threading.main_thread()
                )
                runtime = _runtime = Runtime(inline=inline)
    return runtime


def current() -> Runtime | None:
    """The running runtime of this process, without starting one."""
    runtime = _runtime
    if runtime is None or runtime.pid != os.getpid() or runtime.closed:
        return None
    return runtime


def shutdown(**_: Any) -> None:
    """Close this process's runtime, if it started one. Safe to call more than once."""
    runtime = current()
    if runtime is not None:
        if len(runs):
            logger.warning("%d task session(s) were still registered at shutdown.", len(runs))
        runtime.close()


# No single hook fires for every pool (TRAPS 12): prefork children that exit normally send
# worker_process_shutdown; the main process sends worker_shutdown (solo, threads, gevent,
# eventlet); atexit covers scripts and the in-process test worker.
signals.worker_process_shutdown.connect(shutdown, weak=False)
signals.worker_shutdown.connect(shutdown, weak=False)
signals.worker_process_init.connect(_mark_one_at_a_time, weak=False)
atexit.register(shutdown)
