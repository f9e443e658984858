"""The tables the package writes to, which belong to the user's schema: ``async_session_runs``
(markers of idempotent runs) and ``async_session_outbox`` (messages of durable publishes).

:func:`runs_table` and :func:`outbox_table` add them to the user's ``MetaData`` for
``create_all`` or Alembic's autogenerate; the package builds its statements on its own copies
of the same definitions (:data:`runs`, :data:`outbox`), in the schema the connection's
``search_path`` selects. Times in them are the database server's (``now()``), which wrote
them, never this machine's: the two clocks may differ (:func:`server_time`).
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy import inspect as inspect_schema
from sqlalchemy.ext.asyncio import AsyncConnection

RUNS = "async_session_runs"
OUTBOX = "async_session_outbox"
#: The longest key or task id: a ``String(255)`` column, as most schemas size their keys.
KEY_LENGTH = 255


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
        RUNS,
        metadata,
        Column("key", String(KEY_LENGTH), primary_key=True),
        Column("task_name", String(255), nullable=False),
        Column("task_id", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Index(f"ix_{RUNS}_created_at", "created_at"),
        schema=schema,
    )


def outbox_table(metadata: MetaData, *, schema: str | None = None) -> Table:
    """Add the ``async_session_outbox`` table to ``metadata`` (for ``create_all`` or Alembic's
    autogenerate) and return it. Its DDL on PostgreSQL::

        CREATE TABLE async_session_outbox (
            id VARCHAR(255) PRIMARY KEY,             -- the Celery task id
            task_name VARCHAR(255) NOT NULL,
            content_type VARCHAR(128) NOT NULL,      -- the app's task_serializer
            content_encoding VARCHAR(64) NOT NULL,
            body BYTEA NOT NULL,                     -- the signature, serialized
            created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
            available_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease VARCHAR(64),
            dead_at TIMESTAMP WITH TIME ZONE,
            last_error TEXT
        );
        CREATE INDEX ix_async_session_outbox_available_at
            ON async_session_outbox (available_at) WHERE dead_at IS NULL;
    """
    return Table(
        OUTBOX,
        metadata,
        Column("id", String(KEY_LENGTH), primary_key=True),
        Column("task_name", String(255), nullable=False),
        Column("content_type", String(128), nullable=False),
        Column("content_encoding", String(64), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("available_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("lease", String(64)),
        Column("dead_at", DateTime(timezone=True)),
        Column("last_error", Text),
        Index(
            f"ix_{OUTBOX}_available_at",
            "available_at",
            postgresql_where=text("dead_at IS NULL"),
            sqlite_where=text("dead_at IS NULL"),
        ),
        schema=schema,
    )


runs = runs_table(MetaData())
outbox = outbox_table(MetaData())


def server_time(dialect: str, offset: datetime.timedelta) -> Any:
    """``now() + offset`` on the clock that writes the tables: the database server's, which may
    differ from this machine's; SQLite's is this one (it runs here)."""
    if dialect == "postgresql":
        return func.now() + offset
    return datetime.datetime.now(datetime.UTC) + offset


def missing_table_hint(exc: Exception, table: Table, offer: str) -> str | None:
    """A message that says what to do if ``exc`` is the database's "no such table" for
    ``table``; None for any other error."""
    message = str(getattr(exc, "orig", exc))
    if table.name not in message or not ("exist" in message or "no such" in message):
        return None
    return (
        f"the table {table.name} is missing from this database: add "
        f"async_session_task.{offer}(Base.metadata) to your models and migrate"
    )


async def table_problem(conn: AsyncConnection, table: Table, offer: str) -> str:
    """What keeps ``table`` in the database of ``conn`` from being used as the package uses
    it ("" when nothing does): missing, a column missing, no unique key on its first column."""

    def inspected(sync_conn: Any) -> str:
        inspector = inspect_schema(sync_conn)
        if not inspector.has_table(table.name):
            return f"missing: add {offer}(Base.metadata) and migrate"
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        lacking = sorted({column.name for column in table.columns} - columns)
        if lacking:
            return f"lacks column(s) {', '.join(lacking)}: compare with {offer}()"
        key = [next(iter(table.primary_key.columns)).name]
        unique = [inspector.get_pk_constraint(table.name).get("constrained_columns") or []]
        unique += [c["column_names"] for c in inspector.get_unique_constraints(table.name)]
        unique += [i["column_names"] for i in inspector.get_indexes(table.name) if i["unique"]]
        if key not in unique:
            return f"no primary key or unique index on {key[0]}"
        return ""

    problem: str = await conn.run_sync(inspected)
    return problem
