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
import logging
import os
import threading
from collections.abc import Coroutine
from contextvars import Context
from typing import Any, TypeVar

from celery import signals
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from . import _config
from ._session import runs
from ._waiters import LockWaiter, Waiter, hold_hub, original, waiter_class

T = TypeVar("T")
logger = logging.getLogger("async_session_task")

#: Seconds a cancelled run may take to finish its cleanup before it is reported.
CANCEL_GRACE = 10.0
#: Seconds :func:`shutdown` waits for engines to be disposed.
SHUTDOWN_GRACE = 10.0


class Call:
    """One coroutine submitted to the loop from another thread.

    Unlike ``run_coroutine_threadsafe``, cancelling a :class:`Call` cancels the asyncio task
    and the caller then waits for that task to finish, so the body's ``finally`` blocks and
    the session cleanup have run before the caller moves on (TRAPS 17).
    """

    __slots__ = ("_cancelled", "_context", "_coro", "_task", "_waiter")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: Context, waiter: Waiter) -> None:
        self._coro = coro
        self._context = context
        self._waiter = waiter
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    def start(self) -> None:  # on the loop
        if self._cancelled:
            self._coro.close()
            self._waiter.notify()
            return
        # A context per run (TRAPS 19): ContextVars never leak from one run to the next.
        self._task = asyncio.get_running_loop().create_task(self._coro, context=self._context)
        self._task.add_done_callback(self._done)

    def _done(self, _: object) -> None:
        self._waiter.notify()

    def cancel(self) -> None:  # on the loop
        if self._task is None:
            self._cancelled = True
        else:
            self._task.cancel()

    def result(self) -> Any:
        if self._task is None:
            raise asyncio.CancelledError
        return self._task.result()


class Runtime:
    """The event loop of this process, the thread that runs it, and what lives on it."""

    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.closed = False
        self._stopped = LockWaiter()
        self.new_waiter = waiter_class()
        self._engines: dict[tuple[str, str], AsyncEngine] = {}
        self._makers: dict[type[Any], async_sessionmaker[Any]] = {}
        self._foreign: list[AsyncEngine] = []
        started = LockWaiter()
        original("_thread", "start_new_thread")(self._serve, (started,))
        started.wait()

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

    def call(self, coro: Coroutine[Any, Any, T], context: Context) -> T:
        """Run ``coro`` on the loop in ``context`` and block (cooperatively) for its result.

        If the wait is interrupted (soft time limit, ``gevent.Timeout``, ``KeyboardInterrupt``),
        the coroutine is cancelled at its current await and given :data:`CANCEL_GRACE` seconds
        to finish its cleanup; then the interruption is re-raised (TRAPS 13).
        """
        if self.on_loop():
            coro.close()
            raise RuntimeError(
                "A blocking task call was made on the event loop thread: await the coroutine "
                "instead, or call the task from the task body itself."
            )
        waiter = self.new_waiter()
        call = Call(coro, context, waiter)
        self.loop.call_soon_threadsafe(call.start)
        try:
            waiter.wait()
        except BaseException:
            self.loop.call_soon_threadsafe(call.cancel)
            if not waiter.wait(CANCEL_GRACE):
                logger.warning(
                    "A cancelled task body is still running %.0f s later; it ignores "
                    "asyncio.CancelledError. Its session stays open until it ends.",
                    CANCEL_GRACE,
                )
            raise
        result: T = call.result()
        return result

    def maker_for(self, task: Any) -> async_sessionmaker[Any]:
        """The session factory of ``task``'s class, resolved once per process."""
        maker = self._makers.get(type(task))
        if maker is None:
            with _lock:
                maker = self._makers.get(type(task))
                if maker is None:
                    maker = self._makers[type(task)] = self._resolve(task)
        return maker

    def _resolve(self, task: Any) -> async_sessionmaker[Any]:
        settings = _config.Settings.of(task)
        settings.check(task.name)
        if settings.maker is not None:
            maker = _config.resolve_maker(settings, task.name)
            for engine in _engines_of(maker):
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
        engines = [*self._engines.values(), *self._foreign]
        if engines and self.loop.is_running():
            waiter = LockWaiter()  # blocking is right here: the worker is going away
            call = Call(_dispose(engines), Context(), waiter)
            self.loop.call_soon_threadsafe(call.start)
            if not waiter.wait(SHUTDOWN_GRACE):
                logger.warning("Engines were not disposed within %.0f s.", SHUTDOWN_GRACE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._stopped.wait(SHUTDOWN_GRACE):
            self.loop.close()


async def _dispose(engines: list[AsyncEngine]) -> None:
    for engine in engines:
        try:
            await engine.dispose()
        except Exception:
            logger.exception("Disposing %r failed", engine)


def _engines_of(maker: async_sessionmaker[Any]) -> list[AsyncEngine]:
    bind = maker.kw.get("bind")
    binds = maker.kw.get("binds") or {}
    return [e for e in (bind, *binds.values()) if isinstance(e, AsyncEngine)]


_runtime: Runtime | None = None
# Guards the slow paths only: first start in a process, first run of a task class.
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The runtime of this process, started on first use (after a fork: a new one)."""
    global _runtime
    runtime = _runtime
    if runtime is None or runtime.pid != os.getpid() or runtime.closed:
        with _lock:
            runtime = _runtime
            if runtime is None or runtime.pid != os.getpid() or runtime.closed:
                runtime = _runtime = Runtime()
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
atexit.register(shutdown)
