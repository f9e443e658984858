"""The pre-ping of engines built from ``async_session_url`` on asyncpg: one round trip.

SQLAlchemy's asyncpg adapter pings a pooled connection with three round trips (``BEGIN``,
``;``, ``ROLLBACK``: the transaction keeps its prepared ``;`` on one server connection behind
PgBouncer, sqlalchemy/sqlalchemy#10226). ``SELECT 1`` sent as a simple query prepares
nothing, so it is as safe behind PgBouncer in one round trip. The library pings that way,
from the pool's ``checkout`` event, where ``pool_pre_ping=True`` would have had SQLAlchemy
ping (docs/internals.md#dead-pooled-connections):

* a connection the pool has just opened is not pinged, as SQLAlchemy does not;
* a failed ping raises :class:`~sqlalchemy.exc.InvalidatePoolError`, on which the pool
  replaces this connection and every one opened before it, then checks out anew: what
  SQLAlchemy does when its own ping finds the connection dead.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

#: ``connection_record.info`` key: set on connect, taken by the first checkout.
_FRESH = "async_session_task.fresh"


def replaces_pre_ping(url: URL) -> bool:
    """True for the URLs whose engines this module pings instead of SQLAlchemy: asyncpg's."""
    return url.get_driver_name() == "asyncpg"


def install(engine: AsyncEngine) -> None:
    """Ping ``engine``'s pooled connections on checkout, one round trip each."""
    pool = engine.sync_engine.pool
    event.listen(pool, "connect", _connected)
    event.listen(pool, "checkout", _ping)


def installed(engine: AsyncEngine) -> bool:
    """True if ``engine``'s connections are pinged on checkout by this module."""
    # The pool's listeners, not event.contains(): dispose() replaces the pool, and the new
    # one takes the old one's listeners but not their registration.
    return _ping in engine.sync_engine.pool.dispatch.checkout


def _connected(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_FRESH] = True


def _ping(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    if connection_record.info.pop(_FRESH, False):
        return
    try:
        dbapi_connection.run_async(_select_one)
    except Exception as error:
        reason = f"pre-ping failed: {type(error).__name__}: {error}"
        raise exc.InvalidatePoolError(reason) from error


async def _select_one(connection: Any) -> None:
    # execute() without arguments is asyncpg's simple query protocol: no prepared statement.
    await connection.execute("SELECT 1")
