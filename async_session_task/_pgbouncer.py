"""Engine options for asyncpg behind PgBouncer in transaction pooling mode.

In transaction mode two transactions of one client connection may run on different server
connections, so a prepared statement made in one may be missing from ("does not exist") or
already taken on ("already exists") the next (sqlalchemy/sqlalchemy#6467). What SQLAlchemy's
asyncpg dialect documents for it ("Prepared Statement Name with PGBouncer") is set here
(docs/internals.md#pgbouncer-prepared-statements).
"""

from __future__ import annotations

from typing import Any


def statement_name() -> str:
    """The empty name: PostgreSQL's unnamed statement, which the next statement's parse on
    the same server connection replaces, so none outlives its transaction or piles up."""
    return ""


#: asyncpg's ``connect()`` arguments for transaction pooling.
CONNECT_ARGS: dict[str, Any] = {
    # asyncpg's own statement cache: a cached statement would outlive its transaction.
    "statement_cache_size": 0,
    # The cache of SQLAlchemy's asyncpg adapter, which prepares each statement itself.
    "prepared_statement_cache_size": 0,
    # The adapter still prepares (to learn the result columns, MagicStack/asyncpg#837), then
    # runs the statement in the same transaction, so on the same server connection.
    "prepared_statement_name_func": statement_name,
}


def pgbouncer_engine_options(**options: Any) -> dict[str, Any]:
    """Engine options for ``postgresql+asyncpg`` behind PgBouncer's ``pool_mode = transaction``.

    ``app.conf.async_session_engine_options = pgbouncer_engine_options()`` turns off asyncpg's
    and SQLAlchemy's prepared-statement caches and has each statement prepared unnamed. The
    pool stays SQLAlchemy's ``QueuePool`` with ``pool_pre_ping``, as for a direct connection:
    a worker keeps its client connections to PgBouncer between runs, and a connection a
    PgBouncer restart closed is replaced before a run uses it.

    Args:
        **options: your own engine options, merged over the preset: a key you give wins,
            ``connect_args`` are merged key by key (``poolclass=NullPool`` to connect per run).

    Returns:
        A new dict for ``async_session_engine_options``.
    """
    return {**options, "connect_args": {**CONNECT_ARGS, **(options.get("connect_args") or {})}}
