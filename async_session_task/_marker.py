"""Run markers: an idempotent run writes its key to ``async_session_runs`` (``_tables``) in
its own transaction; what claims, finds and cleans up those keys.

The marker is the database's answer to "did this already happen?": the row commits or rolls
back with the run's writes, and the primary key on ``key`` makes a second run with the same
key wait for the first's transaction to end, then see its marker (docs/running-once.md).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._config import DEFAULT_RUNS_RETENTION
from ._tables import missing_table_hint, runs, server_time, table_problem

#: Markers deleted per statement by :func:`cleanup_runs`: short transactions, short locks.
_CLEANUP_BATCH = 10_000
_runs = runs
#: ``INSERT ... ON CONFLICT DO NOTHING ... RETURNING``, spelled the same by both dialects;
#: built once per dialect, with parameters (a run pays for executing it, not for making it).
_CLAIMS: dict[str, Any] = {
    name: insert(_runs)
    .values(
        key=bindparam("key"),
        task_name=bindparam("task_name"),
        task_id=bindparam("task_id"),
        created_at=func.now(),
    )
    .on_conflict_do_nothing(index_elements=["key"])
    .returning(_runs.c.key)
    for name, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
_HOLDER = select(_runs.c.task_id).where(_runs.c.key == bindparam("key"))


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
    statement = _CLAIMS.get(dialect)
    if statement is None:
        raise NotImplementedError(
            f"idempotent runs need PostgreSQL or SQLite (INSERT ... ON CONFLICT), not {dialect}"
        )
    values = {"key": key, "task_name": task_name, "task_id": task_id}
    try:
        if (await session.execute(statement, values)).first() is not None:
            return None
        # The holder committed before us (READ COMMITTED: this statement sees it).
        holder = await session.scalar(_HOLDER, {"key": key})
    except DBAPIError as exc:
        hint = missing_table_hint(exc, _runs, "runs_table")
        if hint is not None:
            raise MissingTable(
                f"idempotent runs write their marker to {hint} (docs/running-once.md#the-table)."
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
    cutoff = server_time(engine.dialect.name, -older_than)
    oldest = select(_runs.c.key).where(_runs.c.created_at < cutoff).limit(_CLEANUP_BATCH)
    statement = delete(_runs).where(_runs.c.key.in_(oldest.scalar_subquery()))
    deleted = 0
    while True:
        async with engine.begin() as conn:
            count = (await conn.execute(statement)).rowcount
        deleted += count
        if count < _CLEANUP_BATCH:
            return deleted


@dataclass(frozen=True)
class TableFacts:
    """What the check command found of the table; ``problem`` is empty when it is usable."""

    problem: str = ""
    rows: int = 0
    size_bytes: int | None = None
    expired: int = 0


async def table_facts(conn: AsyncConnection, retention: datetime.timedelta) -> TableFacts:
    """The table in the database of ``conn``: missing, unusable, or its size."""

    problem = await table_problem(conn, _runs, "runs_table")
    if problem:
        return TableFacts(problem)
    rows = int(await conn.scalar(select(func.count()).select_from(_runs)) or 0)
    cutoff = server_time(conn.dialect.name, -retention)
    expired = await conn.scalar(
        select(func.count()).select_from(_runs).where(_runs.c.created_at < cutoff)
    )
    size = None
    if conn.dialect.name == "postgresql":
        size = await conn.scalar(select(func.pg_total_relation_size(_runs.name)))
    return TableFacts(rows=rows, size_bytes=size, expired=int(expired or 0))
