"""A task's exactly-once options: the key of an idempotent run, the isolation level of its
transactions, and re-runs after a serialization failure or a deadlock.

Read once per task class (:meth:`Once.of`, when Celery makes the class), so a bad option
fails at import with a message that says what to write, and a task without these options
pays nothing per run. ``_run`` applies them to a run (docs/running-once.md).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._factory import at_isolation_level
from ._tables import KEY_LENGTH

logger = logging.getLogger("async_session_task")

#: The isolation levels a task may ask for (SQLAlchemy's names; PostgreSQL's and SQLite's).
ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE", "READ UNCOMMITTED")
#: Errors after which a transaction is simply run again: PostgreSQL's serialization_failure
#: and deadlock_detected SQLSTATEs ("Serialization Failure Handling"), and SQLite's
#: SQLITE_BUSY, which a writer meets when another holds the database's write lock.
CONFLICTS = {
    "40001": "serialization failure",
    "40P01": "deadlock",
    "SQLITE_BUSY": "database is locked",
}
#: The first re-run waits up to this (seconds, full jitter), doubling per attempt, at most
#: :data:`BACKOFF_CAP`.
BACKOFF_BASE = 0.01
BACKOFF_CAP = 1.0

_counts = {"reruns": 0, "skipped": 0}
_counts_lock = threading.Lock()


class AlreadyRun(Exception):
    """An idempotent run found its key's marker: the run ``holder`` (a task id) has had the
    database effect already."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(key, holder)
        self.key = key
        self.holder = holder


@dataclass(frozen=True)
class Once:
    """The options of one task class; None for a task that sets none."""

    task_name: str
    idempotent: bool | Callable[..., str]
    isolation_level: str | None
    retry_on_conflict: int

    @classmethod
    def of(cls, task_class: Any) -> Once | None:
        """Read and check the options ``idempotent``, ``isolation_level`` and
        ``retry_on_conflict`` of ``task_class``.

        Raises:
            TypeError, ValueError: an option has a value it cannot take.
        """
        name = getattr(task_class, "name", None) or task_class.__qualname__
        idempotent = getattr(task_class, "idempotent", False)
        level = getattr(task_class, "isolation_level", None)
        retries = getattr(task_class, "retry_on_conflict", 0)
        if not (isinstance(idempotent, bool) or callable(idempotent)):
            raise TypeError(
                f"{name}: idempotent must be True (the task id is the key) or a callable "
                f"taking the task's arguments and returning the key, got {idempotent!r}."
            )
        known = isinstance(level, str) and level.upper() in ISOLATION_LEVELS
        if level is not None and not known:
            raise ValueError(
                f"{name}: isolation_level must be one of {', '.join(ISOLATION_LEVELS)}, "
                f"got {level!r}."
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"{name}: retry_on_conflict is how many times the body may run again after "
                f"a serialization failure or a deadlock: an int >= 0, got {retries!r}."
            )
        if not idempotent and level is None and not retries:
            return None
        return cls(name, idempotent, level and level.upper(), retries)

    def key(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The key of this run: the task id, or what the ``idempotent`` callable makes of
        the arguments; None when the task is not idempotent.

        Raises:
            TypeError, ValueError: the callable returned no usable key.
        """
        if self.idempotent is False:
            return None
        key = request.id if self.idempotent is True else self.idempotent(*args, **kwargs)
        if not isinstance(key, str) or not key or len(key) > KEY_LENGTH:
            raise (TypeError if not isinstance(key, str) else ValueError)(
                f"{self.task_name}: the idempotency key must be a non-empty str of at most "
                f"{KEY_LENGTH} characters, got {key!r}: return e.g. f'charge:{{order_id}}'."
            )
        return key

    def again(self, exc: BaseException, attempt: int, run: Any) -> float | None:
        """Seconds to wait before running the body again after ``exc`` ended attempt
        ``attempt``; None when it must not run again (``exc`` is then raised, as is)."""
        state = conflict_code(exc)
        if state not in CONFLICTS or attempt > self.retry_on_conflict:
            return None
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
        count("reruns")
        logger.info(
            "%r: %s (%s) in attempt %d of %d; running the body again in %.3f s",
            run,
            CONFLICTS[state],
            state,
            attempt,
            self.retry_on_conflict + 1,
            delay,
        )
        return delay

    def isolated(self, maker: Callable[[], AsyncSession]) -> Callable[[], AsyncSession]:
        """``maker``, with every transaction of its sessions at :attr:`isolation_level`."""
        level = self.isolation_level
        if level is None:
            return maker

        def make() -> AsyncSession:
            session = maker()
            bind = session.sync_session.bind
            if not isinstance(bind, Engine):
                raise InvalidRequestError(
                    f"{self.task_name}: isolation_level needs sessions bound to one engine; "
                    "with several binds, set isolation_level on the engines themselves."
                )
            session.sync_session.bind = _isolated_engine(bind, level)
            return session

        return make


def _isolated_engine(engine: Engine, level: str) -> Engine:
    # SQLAlchemy applies the level when the connection is checked out and resets it on
    # return to the pool; asyncpg and psycopg send it with BEGIN, so it holds per
    # transaction, through PgBouncer's transaction pooling too
    # (docs/internals.md#isolation-per-transaction).
    return at_isolation_level(engine, level, _sqlite_begin)


def _sqlite_begin(isolated: Engine) -> None:
    if isolated.dialect.name == "sqlite":
        # pysqlite (and aiosqlite over it) begin a transaction only before a write, so a
        # read-modify-write would read outside it: begin at the first statement, and take
        # the write lock there (docs/internals.md#sqlite-begin). Only on this option
        # engine: the user's engine keeps its behaviour.
        event.listen(isolated, "begin", _begin_immediate)


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def one_transaction(session: AsyncSession, run: Any) -> None:
    """Make a commit of ``session`` fail unless it commits the transaction in progress now
    (the one holding the run's marker)."""
    sync = session.sync_session
    sync.info[_MARKED] = (sync.get_transaction(), run)


#: ``Session.info`` key: the transaction of an idempotent run's marker, and the run.
_MARKED = "async_session_task.marked"


def _before_commit(session: Session) -> None:
    # One listener for every Session (a dict lookup for those of other runs), rather than
    # one listened for per idempotent run's session.
    marked = session.info.get(_MARKED)
    if marked is not None and session.get_transaction() is not marked[0]:
        raise InvalidRequestError(
            f"{marked[1]!r} is idempotent: it is one transaction, and its marker was "
            "committed or rolled back with the first. A second commit() would write outside "
            "it, and a redelivered run would repeat those writes. Make the run's writes "
            "before one commit() (or use autocommit=True)."
        )


event.listen(Session, "before_commit", _before_commit)


def conflict_code(exc: BaseException) -> str | None:
    """The SQLSTATE (or SQLite error name) of a database error, however wrapped:
    SQLAlchemy's ``DBAPIError``, its asyncpg adapter's errors (``sqlstate``) and their cause,
    psycopg's errors, sqlite3's (``sqlite_errorname``)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        state = (
            getattr(seen, "sqlstate", None)
            or getattr(seen, "pgcode", None)
            or getattr(seen, "sqlite_errorname", None)
        )
        if isinstance(state, str):
            return state
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return None


def count(what: str) -> None:
    with _counts_lock:
        _counts[what] += 1


def counts() -> dict[str, int]:
    """Re-runs after a conflict and idempotent runs skipped, in this process since it started."""
    with _counts_lock:
        return dict(_counts)
