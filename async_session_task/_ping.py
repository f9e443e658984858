"""The pre-ping of engines built from ``async_session_url`` on asyncpg.

A pooled connection that was in use a moment ago is checked without a round trip: an idle
connection has nothing to read, so a socket with nothing pending is one no server closed.
A server that shut down, restarted or terminated the backend (PostgreSQL sends its error,
then closes; PgBouncer closes) leaves the error or the end of the stream to read, and a
connection asyncpg already saw close is closed. Only then, or after the connection has been
back in the pool for :data:`IDLE_PING_AFTER` seconds (where a silent network failure may hide
behind an empty socket), is it pinged with ``SELECT 1``, one round trip. pgx's pool pings
only a connection idle for more than a second (jackc/pgx#1738), PgDog polls the socket on
every checkout (pgdogdev/pgdog#1318); docs/internals.md#dead-pooled-connections.

SQLAlchemy's asyncpg adapter pings with three round trips (``BEGIN``, ``;``, ``ROLLBACK``:
the transaction keeps its prepared ``;`` on one server connection behind PgBouncer,
sqlalchemy/sqlalchemy#10226). ``SELECT 1`` sent as a simple query prepares nothing, so it is
as safe behind PgBouncer. The library pings from the pool's ``checkout`` event, where
``pool_pre_ping=True`` would have had SQLAlchemy ping:

* a connection the pool has just opened is not pinged, as SQLAlchemy does not;
* a dead connection raises :class:`~sqlalchemy.exc.InvalidatePoolError`, on which the pool
  replaces this connection and every one opened before it, then checks out anew: what
  SQLAlchemy does when its own ping finds the connection dead.
"""

from __future__ import annotations

import select
import time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _waiters

#: ``connection_record.info`` key: set on connect, taken by the first checkout.
_FRESH = "async_session_task.fresh"
#: ``connection_record.info`` key: ``time.monotonic()`` when the connection came back.
_RETURNED = "async_session_task.returned"
#: Seconds back in the pool after which a connection is pinged with a round trip, whatever
#: its socket says (pgx's pool: one second).
IDLE_PING_AFTER = 1.0


def replaces_pre_ping(url: URL) -> bool:
    """True for the URLs whose engines this module pings instead of SQLAlchemy: asyncpg's."""
    return url.get_driver_name() == "asyncpg"


def install(engine: AsyncEngine) -> None:
    """Check ``engine``'s pooled connections on checkout (:func:`_ping`)."""
    pool = engine.sync_engine.pool
    event.listen(pool, "connect", _connected)
    event.listen(pool, "checkin", _returned)
    event.listen(pool, "checkout", _ping)


def installed(engine: AsyncEngine) -> bool:
    """True if ``engine``'s connections are pinged on checkout by this module."""
    # The pool's listeners, not event.contains(): dispose() replaces the pool, and the new
    # one takes the old one's listeners but not their registration.
    return _ping in engine.sync_engine.pool.dispatch.checkout


def _connected(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_FRESH] = True


def _returned(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_RETURNED] = time.monotonic()


def _ping(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    info = connection_record.info
    if info.pop(_FRESH, False):
        return
    connection = dbapi_connection.driver_connection
    if connection.is_closed():  # asyncpg read the server's goodbye while the loop ran
        raise exc.InvalidatePoolError("pre-ping: the server closed the connection")
    returned = info.get(_RETURNED)
    recent = returned is not None and time.monotonic() - returned < IDLE_PING_AFTER
    if recent and not _pending(connection):
        return
    try:
        dbapi_connection.run_async(_select_one)
    except Exception as error:
        reason = f"pre-ping failed: {type(error).__name__}: {error}"
        raise exc.InvalidatePoolError(reason) from error


def _pending(connection: Any) -> bool:
    """True if the idle connection's socket has something to read (an error, the end of the
    stream, a notification), or if it cannot be told: then a round trip decides."""
    # asyncpg keeps its transport private (docs/internals.md#upstream-private-names).
    transport = getattr(connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.fileno() < 0:
        return True
    # The unpatched poll: a gevent or eventlet one would wait on their hub, and this runs
    # on the loop's thread (docs/internals.md#monkey-patched-threads).
    poller = _waiters.original("select", "poll")()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def _select_one(connection: Any) -> None:
    # execute() without arguments is asyncpg's simple query protocol: no prepared statement.
    await connection.execute("SELECT 1")
