"""Helpers for testing ``AsyncSessionTask`` tasks.

* ``rollback_sessions``: run tasks in the test process (``apply()``, eager mode, a direct
  call) with every session bound to one connection whose transaction is rolled back at the
  end, so tests are isolated even when the tasks commit.
* ``worker_process``: a real ``celery worker`` in a subprocess, on a queue of its own.
* ``override_lifespan_state``: runs in the test process see a state of the test's own
  instead of entering the ``async_session_lifespan``.

The pytest plugin of this package (``async_session_task._pytest_plugin``, registered through
the ``pytest11`` entry point) wraps both in fixtures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from celery.canvas import Signature
from celery.exceptions import ImproperlyConfigured
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from . import _on_commit
from ._factory import factories
from ._lifespan import lifespans
from ._runtime import get_runtime
from ._task import AsyncSessionTask

__all__ = [
    "QueuedCalls",
    "RollbackSessions",
    "WorkerProcess",
    "file_broker_settings",
    "override_lifespan_state",
    "rollback_sessions",
    "worker_process",
]

T = TypeVar("T")

#: Lines a worker writes when a loop, a connection or a session was not shut down properly.
SHUTDOWN_PROBLEMS = (
    "Event loop is closed",
    "was not closed",
    "never awaited",
    "still registered at shutdown",
    "Unclosed",
    "Task was destroyed but it is pending",
)


def file_broker_settings(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Celery settings for a broker and result backend that need no server.

    kombu's filesystem transport carries the messages (control commands such as ``ping``
    included) and Celery's file backend stores the results, both in ``folder``, which the
    test process and its workers must share. For ``app.conf.update(...)``; slower than
    Redis, and for one machine only. The transport is kombu's, except that a message file
    appears only once it is complete (see ``_filebroker``).
    """
    root = Path(folder)
    messages, control, results = root / "messages", root / "control", root / "results"
    for path in (messages, control, results):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport": "async_session_task._filebroker:Transport",
        "broker_transport_options": {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            # The transport polls its folder; the default (1 s) makes every ping slow.
            "polling_interval": 0.05,
        },
        "result_backend": f"file://{results}",
    }


@dataclass
class WorkerProcess:
    """A running ``celery worker`` started by ``worker_process``."""

    app: Any
    nodename: str
    queue: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        """Everything the worker has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def ping(self, timeout: float = 1.0) -> bool:
        replies = self.app.control.ping(destination=[self.nodename], timeout=timeout)
        return any(self.nodename in reply for reply in replies)

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        """Send ``task`` (or a task name) with ``args`` to this worker's queue, through
        ``app``'s broker (which may differ from the broker the task's own app uses)."""
        name = task if isinstance(task, str) else task.name
        return self.app.send_task(name, args, queue=self.queue, **options)

    def child_pids(self) -> list[int]:
        stats = self.app.control.inspect(destination=[self.nodename], timeout=2).stats() or {}
        pool = stats.get(self.nodename, {}).get("pool", {})
        return [int(pid) for pid in pool.get("processes", [])]

    def shutdown_problems(self) -> list[str]:
        """Log lines that tell of a loop, connection or session not shut down properly."""
        return [
            line
            for line in self.log.splitlines()
            if any(problem in line for problem in SHUTDOWN_PROBLEMS)
        ]

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (SIGTERM): running tasks finish, then the worker exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"worker {self.nodename} did not stop:\n{self.log}") from None


@contextlib.contextmanager
def worker_process(
    app: Any,
    module: str,
    *,
    pool: str = "prefork",
    concurrency: int = 2,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    name: str | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[WorkerProcess]:
    """Run ``celery -A module worker`` in a subprocess on a queue of its own.

    ``app`` is the same Celery app in the calling process (used to ping the worker and to
    send tasks); ``module`` is its import path, as for ``celery -A``. ``name`` (random by
    default) names the queue ``q-<name>`` and the node ``w-<name>@<host>``. The worker is ready
    when it answers a ping; on exit it gets a warm shutdown and is waited for.
    """
    name = name or uuid.uuid4().hex[:12]
    queue = f"q-{name}"
    nodename = f"w-{name}@{os.uname().nodename}"
    with tempfile.TemporaryDirectory(prefix="ast-worker-") as tmp:
        log_path = Path(tmp) / "worker.log"
        command = [
            sys.executable, "-m", "celery", "-A", module, "worker",
            "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", nodename,
            "--without-gossip", "--without-mingle", "-l", "INFO", *args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        worker = WorkerProcess(app, nodename, queue, process, log_path)
        try:
            deadline = time.monotonic() + startup_timeout
            while not worker.ping():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {nodename} did not start:\n{worker.log}")
            yield worker
        finally:
            worker.stop()


@dataclass
class QueuedCalls:
    """What the commits of a ``rollback_sessions`` scope would have published (``on_commit``).

    Those commits only release savepoints of a transaction that is rolled back, so nothing
    is published: each commit appends its queued signatures here, in order. Calls queued in
    a transaction that did not commit never appear.
    """

    #: The signatures, in the order they would have been published.
    signatures: list[Signature] = field(default_factory=list)

    def __call__(self, queued: list[tuple[Signature, str]]) -> None:
        self.signatures.extend(signature for signature, _ in queued)

    @property
    def names(self) -> list[str]:
        """The task name of each signature (``celery.chain``, ``celery.group`` for those)."""
        return [str(signature["task"]) for signature in self.signatures]

    def release(self, *, eager: bool = True) -> list[AsyncResult]:
        """Take the signatures out and run them, in order; what they queue is held again.

        ``eager=True`` (the default) runs each here (``signature.apply()``): tasks of the scope
        then see what the body wrote, which a worker could not (it was never committed).
        ``eager=False`` publishes them (``signature.apply_async()``).
        """
        signatures, self.signatures = self.signatures, []
        if eager:
            return [signature.apply() for signature in signatures]
        return [signature.apply_async() for signature in signatures]


@dataclass
class RollbackSessions:
    """What ``rollback_sessions`` yields: the connections and the session factories."""

    #: One connection per database, open on the library's event loop, inside a transaction
    #: that is rolled back when the scope ends.
    connections: dict[AsyncEngine, AsyncConnection] = field(default_factory=dict)
    #: The session factory that runs of each task class use in this scope.
    makers: dict[type[Any], async_sessionmaker[Any]] = field(default_factory=dict)
    #: What the scope's commits queued with ``on_commit``: held here, never published.
    on_commit: QueuedCalls = field(default_factory=QueuedCalls)

    def maker(self, task: Any = None) -> async_sessionmaker[Any]:
        """The session factory of ``task`` (a task or task class); any, if there is one DB.

        Raises:
            LookupError: ``task`` is not in this scope, or ``task`` is None and the tasks
                use more than one database.
        """
        if task is not None:
            cls = task if isinstance(task, type) else type(_unproxied(task))
            if cls not in self.makers:
                raise LookupError(f"{cls.__name__} does not run in this rollback scope.")
            return self.makers[cls]
        distinct = {id(maker.kw["bind"]): maker for maker in self.makers.values()}
        if len(distinct) != 1:
            raise LookupError(
                f"The tasks use {len(distinct)} databases here: name the task, maker(task)."
            )
        return next(iter(distinct.values()))

    def run(self, function: Callable[[AsyncSession], Awaitable[T]], task: Any = None) -> T:
        """``await function(session)`` on the library's loop, with a session of this scope.

        This is how a test reads (or prepares) data inside the rolled-back transaction: the
        connection belongs to the library's loop and cannot be used from another one
        (a pytest-asyncio test's, say). Blocks until done; the session is closed after.
        """
        maker = self.maker(task)

        async def call() -> T:
            async with maker() as session:
                return await function(session)

        return get_runtime().call(call())


@contextlib.contextmanager
def rollback_sessions(app: Any, tasks: Iterable[Any] | None = None) -> Iterator[RollbackSessions]:
    """Run ``AsyncSessionTask`` tasks of ``app`` in a transaction rolled back at the end.

    For each database the tasks use (the ``async_session_url`` or ``async_session_maker`` they
    are configured with), one connection is opened on the library's event loop and a
    transaction begun. Every run of those tasks in this process (``apply()``,
    ``task_always_eager``, a direct call) then gets a session bound to that connection with
    ``join_transaction_mode="create_savepoint"``: its ``commit()`` releases a savepoint, a
    rollback or close returns to the savepoint, and at exit the whole transaction is rolled
    back. What those commits queue with ``on_commit`` is held in ``scope.on_commit``
    (:class:`QueuedCalls`), never published. Runs in worker processes are not affected.
    Runs must not overlap (they share one connection), which eager runs in a test do not.

    ``tasks`` (default: every ``AsyncSessionTask`` of ``app``) picks the tasks; with the
    default, a task without a usable database setting is left alone (its runs fail as usual).

    Raises:
        celery.exceptions.ImproperlyConfigured: a task given in ``tasks`` has no usable
            database setting.
        ValueError: a task's ``async_session_maker`` is not bound to one ``AsyncEngine``.
    """
    runtime = get_runtime()
    chosen = list(app.tasks.values()) if tasks is None else list(tasks)
    originals: dict[type[Any], async_sessionmaker[Any]] = {}
    for task in map(_unproxied, chosen):
        if not isinstance(task, AsyncSessionTask):
            continue
        try:
            originals[type(task)] = factories.maker_for(task)
        except ImproperlyConfigured:
            if tasks is not None:
                raise
    scope = RollbackSessions()
    transactions: dict[AsyncEngine, _Transaction] = {}
    try:
        for cls, maker in originals.items():
            engine = _engine_of(maker, cls)
            if engine not in transactions:
                transactions[engine] = runtime.call(_begin(engine))
                scope.connections[engine] = transactions[engine].connection
            options = {**maker.kw, "bind": scope.connections[engine]}
            # Their commits only release savepoints: what they queue is held, not published.
            info = {**(options.get("info") or {}), _on_commit.CAPTURE: scope.on_commit}
            options["info"] = info
            scope.makers[cls] = async_sessionmaker(
                class_=maker.class_, **options, join_transaction_mode="create_savepoint"
            )
        with factories.override(scope.makers):
            yield scope
    finally:
        for transaction in transactions.values():
            runtime.call(transaction.end())


@contextlib.contextmanager
def override_lifespan_state(state: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Within the block, runs in this process (``apply()``, eager mode, a direct call) see
    ``state`` as their ``lifespan_state()``, and no ``async_session_lifespan`` is entered:
    a test substitutes its own clients (a fake HTTP transport, a test Redis database).

    Runs in worker processes are not affected.
    """
    with lifespans.substitute(state):
        yield state


def _unproxied(task: Any) -> Any:
    """The task itself, also for the lazy proxy ``@app.task`` returns before finalization."""
    resolve = getattr(task, "_get_current_object", None)
    return task if resolve is None else resolve()


def _engine_of(maker: async_sessionmaker[Any], cls: type[Any]) -> AsyncEngine:
    bind = maker.kw.get("bind")
    if maker.kw.get("binds") or not isinstance(bind, AsyncEngine):
        raise ValueError(
            f"rollback_sessions needs the session factory of {cls.__name__} to be bound to "
            f"one AsyncEngine (bind=engine); it has bind={bind!r}, "
            f"binds={maker.kw.get('binds')!r}."
        )
    return bind


@dataclass
class _Transaction:
    connection: AsyncConnection
    sqlite_isolation: Any = None

    async def end(self) -> None:
        """Roll back everything the scope did and give the connection back as it was."""
        try:
            await self.connection.rollback()
            if self.sqlite_isolation is not None:
                level = self.sqlite_isolation
                await self.connection.run_sync(lambda c: _set_isolation(c, level))
        finally:
            await self.connection.close()


async def _begin(engine: AsyncEngine) -> _Transaction:
    connection = await engine.connect()
    try:
        await connection.begin()
        if engine.dialect.name != "sqlite":
            return _Transaction(connection)
        # sqlite3 (under aiosqlite) emits BEGIN lazily, before the first INSERT/UPDATE: a
        # session's SAVEPOINT would open the transaction and its RELEASE commit it. Take over
        # transaction control on this one connection (SQLAlchemy docs, SQLite dialect,
        # "Serializable isolation / Savepoints / Transactional DDL").
        level = await connection.run_sync(lambda c: _set_isolation(c, None))
        await connection.exec_driver_sql("BEGIN")
        return _Transaction(connection, level)
    except BaseException:
        await connection.close()
        raise


def _set_isolation(connection: Any, level: str | None) -> str | None:
    dbapi = connection.connection.dbapi_connection
    previous: str | None = dbapi.isolation_level
    dbapi.isolation_level = level
    return previous
