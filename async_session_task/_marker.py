"""Run markers: the table ``async_session_runs``, where an idempotent run writes its key in its
own transaction, and what claims, finds and cleans up those keys.

The marker is the database's answer to "did this already happen?": the row commits or rolls
back with the run's writes, and the primary key on ``key`` makes a second run with the same
key wait for the first's transaction to end, then see its marker (docs/running-once.md). The
table belongs to the user's schema: :func:`runs_table` adds it to their ``MetaData`` for
Alembic; the package uses its own copy of the same definition to build its statements.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table, delete, func, select
from sqlalchemy import inspect as inspect_schema
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._config import DEFAULT_RUNS_RETENTION

#: The table's name, in the schema the connection's ``search_path`` selects.
TABLE = "async_session_runs"
#: The longest key: a ``String(255)`` column, as most schemas size their keys.
KEY_LENGTH = 255
#: Markers deleted per statement by :func:`cleanup_runs`: short transactions, short locks.
_CLEANUP_BATCH = 10_000


def runs_table(metadata: MetaData, *, schema: str | None = None) -> Table:
    """Add the ``async_session_runs`` table to ``metadata`` (for ``create_all`` or Alembic's
    autogenerate) and return it. Its DDL on PostgreSQL::

        CREATE TABLE async_session_runs (
            key VARCHAR(255) PRIMARY KEY,
            task_name VARCHAR(255) NOT NULL,
            task_id VARCHAR(255) NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_async_session_runs_created_at ON async_session_runs (created_at);
    """
    return Table(
        TABLE,
        metadata,
        Column("key", String(KEY_LENGTH), primary_key=True),
        Column("task_name", String(255), nullable=False),
        Column("task_id", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Index(f"ix_{TABLE}_created_at", "created_at"),
        schema=schema,
    )


_runs = runs_table(MetaData())
#: ``INSERT ... ON CONFLICT DO NOTHING ... RETURNING`` is spelled the same by both dialects.
_INSERTS: dict[str, Callable[[Table], Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


class MissingTable(RuntimeError):
    """The database has no ``async_session_runs`` table."""


async def claim(session: AsyncSession, key: str, task_name: str, task_id: str) -> str | None:
    """Write the marker of ``key`` in ``session``'s transaction (begun here if none is).

    Returns None when this run holds the key now; else the task id of the run that holds
    it. A run whose transaction is still open holds it too: the INSERT waits on the primary
    key until that transaction ends (then claims the key if it rolled back;
    docs/internals.md#on-conflict-waits).

    Raises:
        MissingTable: the table is not in the database.
        NotImplementedError: the database is neither PostgreSQL nor SQLite.
    """
    dialect = session.get_bind().dialect.name
    insert = _INSERTS.get(dialect)
    if insert is None:
        raise NotImplementedError(
            f"idempotent runs need PostgreSQL or SQLite (INSERT ... ON CONFLICT), not {dialect}"
        )
    statement = (
        insert(_runs)
        .values(key=key, task_name=task_name, task_id=task_id, created_at=func.now())
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(_runs.c.key)
    )
    try:
        if (await session.execute(statement)).first() is not None:
            return None
        # The holder committed before us (READ COMMITTED: this statement sees it).
        holder = await session.scalar(select(_runs.c.task_id).where(_runs.c.key == key))
    except DBAPIError as exc:
        if TABLE in str(exc.orig) and ("exist" in str(exc.orig) or "no such" in str(exc.orig)):
            raise MissingTable(
                f"idempotent runs write their marker to the table {TABLE}, which this "
                "database lacks: add async_session_task.runs_table(Base.metadata) to your "
                "models and migrate (docs/running-once.md#the-table)."
            ) from exc
        raise
    return holder or ""


async def cleanup_runs(
    bind: AsyncEngine | AsyncConnection, *, older_than: datetime.timedelta = DEFAULT_RUNS_RETENTION
) -> int:
    """Delete the markers written more than ``older_than`` ago, in batches of 10,000 each in
    its own transaction; return how many were deleted.

    A run redelivered after its marker is gone runs again: keep ``older_than`` above the
    longest time a message can wait for redelivery (``visibility_timeout``, a relay's
    backlog).
    """
    engine = bind if isinstance(bind, AsyncEngine) else bind.engine
    cutoff = _cutoff(engine.dialect.name, older_than)
    oldest = select(_runs.c.key).where(_runs.c.created_at < cutoff).limit(_CLEANUP_BATCH)
    statement = delete(_runs).where(_runs.c.key.in_(oldest.scalar_subquery()))
    deleted = 0
    while True:
        async with engine.begin() as conn:
            count = (await conn.execute(statement)).rowcount
        deleted += count
        if count < _CLEANUP_BATCH:
            return deleted


def _cutoff(dialect: str, older_than: datetime.timedelta) -> Any:
    """The time before which markers are old, on the clock that wrote them: the database
    server's (``now()``), which may differ from this machine's; SQLite's is this one."""
    if dialect == "postgresql":
        return func.now() - older_than
    return datetime.datetime.now(datetime.UTC) - older_than


@dataclass(frozen=True)
class TableFacts:
    """What the check command found of the table; ``problem`` is empty when it is usable."""

    problem: str = ""
    rows: int = 0
    size_bytes: int | None = None
    expired: int = 0


async def table_facts(conn: AsyncConnection, retention: datetime.timedelta) -> TableFacts:
    """The table in the database of ``conn``: missing, unusable, or its size."""

    def inspected(sync_conn: Any) -> tuple[bool, set[str], list[str]]:
        inspector = inspect_schema(sync_conn)
        if not inspector.has_table(TABLE):
            return False, set(), []
        columns = {column["name"] for column in inspector.get_columns(TABLE)}
        unique = [inspector.get_pk_constraint(TABLE).get("constrained_columns") or []]
        unique += [c["column_names"] for c in inspector.get_unique_constraints(TABLE)]
        unique += [i["column_names"] for i in inspector.get_indexes(TABLE) if i["unique"]]
        return True, columns, ["key" if names == ["key"] else "" for names in unique]

    exists, columns, unique = await conn.run_sync(inspected)
    if not exists:
        return TableFacts("missing: add runs_table(Base.metadata) and migrate")
    lacking = sorted({column.name for column in _runs.columns} - columns)
    if lacking:
        return TableFacts(f"lacks column(s) {', '.join(lacking)}: compare with runs_table()")
    if "key" not in unique:
        return TableFacts("no primary key or unique index on key: a second run cannot wait")
    rows = int(await conn.scalar(select(func.count()).select_from(_runs)) or 0)
    cutoff = _cutoff(conn.dialect.name, retention)
    expired = await conn.scalar(
        select(func.count()).select_from(_runs).where(_runs.c.created_at < cutoff)
    )
    size = None
    if conn.dialect.name == "postgresql":
        size = await conn.scalar(select(func.pg_total_relation_size(TABLE)))
    return TableFacts(rows=rows, size_bytes=size, expired=int(expired or 0))
