"""The worker side of the Celery face: every signal this package connects, the checks made
at worker start, and ``celery inspect async_session_stats``.

No single signal fires for every pool (docs/internals.md#worker-signals): the loop starts
lazily at a process's first run, and is shut down by whichever of
``worker_process_shutdown`` (prefork children that exit normally), ``worker_shutdown`` (the
main process, every pool) and ``atexit`` (scripts, in-process test workers) comes first.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

from celery import signals
from celery.exceptions import ImproperlyConfigured
from celery.worker.control import inspect_command
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _config, _factory, _once, _outbox, _pools, _process, _runtime
from ._factory import factories
from ._lifespan import lifespans
from ._on_commit import publish_failures
from ._registry import runs
from ._relay_service import EmbeddedRelay
from ._run import task_factory
from ._task import AsyncSessionTask, async_session_tasks

logger = logging.getLogger("async_session_task")

# What every loop of this package runs: tasks a run starts belong to it (and the stall
# watchdog asks the registry which run holds the loop); before it stops,
# the lifespans are exited (they may still use the engines), then the engines are disposed;
# a lost loop takes its lifespans and engines with it.
_runtime.hooks.task_factory = task_factory
_runtime.hooks.holder = runs.holding
_runtime.hooks.stopping.append(lifespans.exit)
_runtime.hooks.stopping.append(factories.dispose)
_runtime.hooks.lost.append(lifespans.forget)
_runtime.hooks.lost.append(factories.forget)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """``worker_init``: sent once, in the worker's main process, for every pool, after the
    task modules were imported and before prefork children are forked (they inherit what
    is recorded here)."""
    pool_cls = getattr(sender, "pool_cls", None)
    name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    _process.set_worker_pool(_pools.pool_name(name), os.getpid())
    app = getattr(sender, "app", None)
    if app is not None:
        check_worker_tasks(app)
        check_pool_capacity(app, getattr(sender, "concurrency", None))


def check_worker_tasks(app: Any) -> None:
    """Log every ``AsyncSessionTask`` of ``app`` whose settings cannot make sessions.

    The worker still starts (it may serve other tasks); such a task fails each run with the
    same :class:`ImproperlyConfigured` message, made by the same code.
    """
    for task in async_session_tasks(app):
        engines: dict[_config.EngineKey, AsyncEngine] = {}
        try:
            _factory.session_factory(_config.Settings.of(task), engines)
        except ImproperlyConfigured as exc:
            logger.error("Task %s will fail every run: %s", task.name, exc)
        for engine in engines.values():  # made, never connected: nothing to close
            engine.sync_engine.dispose(close=False)
        try:
            _config.lifespan_of(task)
        except ImproperlyConfigured as exc:
            logger.error("Task %s will fail every run: %s", task.name, exc)


def check_pool_capacity(app: Any, concurrency: int | None) -> None:
    """Warn once per pool when one process runs more tasks at once than its engine can
    give connections to (threads, gevent, eventlet; prefork and solo run one at a time)."""
    pool = _process.worker_pool()
    if not concurrency or pool is None:
        return
    _, runs = _pools.processes_and_runs(pool, concurrency)
    warned: set[tuple[Any, ...]] = set()
    for task in async_session_tasks(app):
        try:
            settings = _config.Settings.of(task)
            capacity, where = _factory.pool_capacity(settings)
        except Exception:  # misconfiguration is reported by check_worker_tasks
            continue
        if capacity is None or capacity >= runs or where in warned:
            continue
        warned.add(where)
        logger.warning(
            "The connection pool holds at most %d connections, but this worker runs up to "
            "%d tasks at once in one process: runs will wait for a connection (and fail "
            "after pool_timeout). Raise pool_size/max_overflow in %s to %d or more.",
            capacity,
            runs,
            "async_session_engine_options" if settings.maker is None else "your engine",
            runs,
        )


_relay_thread: EmbeddedRelay | None = None


def start_relay(sender: Any = None, **_: Any) -> None:
    """``worker_ready`` (the main process, every pool): start the outbox relay if the app
    asks for it (``async_session_outbox_relay``)."""
    global _relay_thread
    app = getattr(sender, "app", None)
    if app is not None and app.conf.get(_config.OUTBOX_RELAY) and _relay_thread is None:
        _relay_thread = EmbeddedRelay(app)
        _relay_thread.start()


def stop_relay(**_: Any) -> None:
    """``worker_shutdown``: stop the relay after its batch in progress."""
    global _relay_thread
    if _relay_thread is not None:
        _relay_thread.stop()
        _relay_thread = None


def shutdown(**_: Any) -> None:
    """Close this process's loop, if it started one (its engines are disposed on it)."""
    if _runtime.current() is not None and len(runs):
        logger.warning("%d task session(s) were still registered at shutdown.", len(runs))
    _runtime.shutdown()


@inspect_command()  # type: ignore[untyped-decorator]  # celery is untyped
def async_session_stats(state: Any, **_: Any) -> dict[str, Any]:
    """Pid, whether an event loop runs, live sessions and engines of this process, and the
    messages of committed transactions it could not publish (``on_commit``).

    In a prefork worker the main process never starts a loop; each child has its own, and
    reports leaked sessions in its log when it exits.
    """
    once, outbox = _once.counts(), _outbox.counts()
    return {
        "pid": os.getpid(),
        "loop_running": _runtime.current() is not None,
        "sessions": len(runs),
        "engines": factories.engine_count(),
        "publish_failures": publish_failures(),
        # Bodies run again after a serialization failure or deadlock; idempotent runs
        # skipped because their key had run (docs/running-once.md).
        "conflict_reruns": once["reruns"],
        "skipped_runs": once["skipped"],
        # Durable messages this process left to the relay, and rows it deleted after
        # publishing them (docs/outbox.md#monitoring).
        "outbox_left_to_relay": outbox["left_to_relay"],
        "outbox_deleted": outbox["deleted"],
        "outbox_delete_failures": outbox["delete_failures"],
    }


signals.worker_init.connect(on_worker_init, weak=False)
signals.task_postrun.connect(AsyncSessionTask._forget_run, weak=False)
signals.worker_process_shutdown.connect(shutdown, weak=False)
signals.worker_shutdown.connect(shutdown, weak=False)
signals.worker_ready.connect(start_relay, weak=False)
signals.worker_shutdown.connect(stop_relay, weak=False)
atexit.register(shutdown)
