"""Runs in the test process on connections whose transaction is rolled back at the end
(``async_session_task.testing`` names them)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery.canvas import Signature
from celery.exceptions import ImproperlyConfigured
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from async_session_task import _on_commit
from async_session_task._factory import factories
from async_session_task._runtime import get_runtime
from async_session_task._task import AsyncSessionTask, async_session_tasks

T = TypeVar("T")


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

        return get_runtime().run(call())


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
    runtime = get_runtime(app)
    chosen = async_session_tasks(app) if tasks is None else list(map(_unproxied, tasks))
    originals: dict[type[Any], async_sessionmaker[Any]] = {}
    for task in chosen:
        if not isinstance(task, AsyncSessionTask):  # a task of another base: left alone
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
                transactions[engine] = runtime.run(_begin(engine))
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
            runtime.run(transaction.end())


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
