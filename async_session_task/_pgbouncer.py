"""Engine options for asyncpg behind PgBouncer in transaction pooling mode.

In transaction mode two transactions of one client connection may run on different server
connections, so a prepared statement made in one may be missing from ("does not exist") or
already taken on ("already exists") the next (sqlalchemy/sqlalchemy#6467). What SQLAlchemy's
asyncpg dialect documents for it ("Prepared Statement Name with PGBouncer") is set here
(docs/internals.md#pgbouncer-prepared-statements).
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from sqlalchemy.pool import NullPool

#: Options of SQLAlchemy's ``QueuePool``: given one of them, the caller sizes a pool of its own.
_QUEUE_POOL_OPTIONS = frozenset({"pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"})


def statement_name() -> str:
    """A prepared-statement name no other client of the server connection can be using."""
    return f"__asyncpg_{uuid4()}__"


#: asyncpg's ``connect()`` arguments for transaction pooling.
CONNECT_ARGS: dict[str, Any] = {
    # asyncpg's own statement cache: a cached statement would outlive its transaction.
    "statement_cache_size": 0,
    # The cache of SQLAlchemy's asyncpg adapter, which prepares each statement itself.
    "prepared_statement_cache_size": 0,
    # The adapter still prepares (to learn the result columns, MagicStack/asyncpg#837): a
    # unique name cannot collide with one another client left on the server connection.
    "prepared_statement_name_func": statement_name,
}


def pgbouncer_engine_options(**options: Any) -> dict[str, Any]:
    """Engine options for ``postgresql+asyncpg`` behind PgBouncer's ``pool_mode = transaction``.

    ``app.conf.async_session_engine_options = pgbouncer_engine_options()`` turns off asyncpg's
    and SQLAlchemy's prepared-statement caches, names each prepared statement uniquely, and
    uses ``NullPool`` (PgBouncer is the pool; a worker holds a connection only during a run).

    Args:
        **options: your own engine options, merged over the preset: a key you give wins,
            ``connect_args`` are merged key by key. Give ``poolclass``, or a ``QueuePool``
            option (``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_use_lifo``), to
            keep a pool of client connections to PgBouncer instead of ``NullPool``.

    Returns:
        A new dict for ``async_session_engine_options``.
    """
    merged: dict[str, Any] = {}
    if "poolclass" not in options and not _QUEUE_POOL_OPTIONS & options.keys():
        merged["poolclass"] = NullPool
    merged.update(options)
    merged["connect_args"] = {**CONNECT_ARGS, **(options.get("connect_args") or {})}
    return merged
