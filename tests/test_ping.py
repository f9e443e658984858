"""The pre-ping of asyncpg engines built from ``async_session_url``: no round trip for a
connection in use a moment ago whose socket has nothing to read, one (``SELECT 1``) for a
connection back in the pool for a second or with something pending, none for a new one;
and a dead connection replaced before a session sees it, however it died. On a real
PostgreSQL; the same default on real workers through a server restart is in
tests/faults/test_postgres.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from async_session_task import _ping
from async_session_task._config import Settings
from async_session_task._factory import create_engine
from tests.helpers import pg_query


def engine_for(database_url: str, **options: Any) -> tuple[AsyncEngine, list[str]]:
    """An engine as the library builds it, and the statements its connections send."""
    settings = Settings(url=database_url, engine_options=options, session_options={}, maker=None)
    engine = create_engine(settings)
    sent: list[str] = []

    @event.listens_for(engine.sync_engine.pool, "connect")
    def log_queries(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda query: sent.append(query.query))

    return engine, sent


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("select pg_backend_pid()"))).scalar_one())


def test_a_pooled_connection_is_checked_without_a_round_trip_then_pinged_once_idle(
    database_url: str,
) -> None:
    engine, sent = engine_for(database_url)
    assert _ping.installed(engine)
    assert engine.sync_engine.pool._pre_ping is False  # SQLAlchemy's three round trips: off

    async def checkout() -> list[str]:
        sent.clear()
        await backend_pid(engine)
        return sent[:]

    async def scenario() -> list[list[str]]:
        try:
            first = await checkout()  # a new connection: no ping
            again = await checkout()  # the same connection, back a moment ago
            await asyncio.sleep(_ping.IDLE_PING_AFTER + 0.1)
            idle = await checkout()  # the same, back in the pool for over a second
            return [first, again, idle]
        finally:
            await engine.dispose()

    first, again, idle = asyncio.run(scenario())
    # asyncpg's query logger shows what is sent as a simple query, not prepared statements:
    # SQLAlchemy's own ping would show "BEGIN;", "ROLLBACK;" before the run's transaction.
    assert first == ["BEGIN;", "ROLLBACK;"], first
    assert again == ["BEGIN;", "ROLLBACK;"], again
    assert idle == ["SELECT 1", "BEGIN;", "ROLLBACK;"], idle


#: How the pooled connection's server end goes, between two runs a moment apart:
#: - ``unread``: terminated while the loop is busy (a prefork child between tasks): the
#:   server's error and the end of the stream wait in the socket;
#: - ``read``: terminated, then the loop runs (a threads worker's loop thread): asyncpg has
#:   seen the connection close.
DEATHS = ["unread", "read"]


@pytest.mark.parametrize("death", DEATHS)
@pytest.mark.parametrize("pre_ping", [True, False], ids=["default", "pool_pre_ping=False"])
def test_a_dead_pooled_connection(database_url: str, pre_ping: bool, death: str) -> None:
    """Killed between two runs: with the ping, replaced unseen; without it, the run fails."""
    options = {} if pre_ping else {"pool_pre_ping": False}
    engine, _ = engine_for(database_url, **options)

    async def scenario() -> tuple[int, int | BaseException]:
        try:
            old = await backend_pid(engine)
            # A blocking call: the loop does not run until it returns.
            rows = pg_query(database_url, "select pg_terminate_backend(%s, 5000)", old)
            assert rows == [(True,)]
            if death == "read":
                await asyncio.sleep(0.05)
            try:
                return old, await backend_pid(engine)
            except DBAPIError as error:
                return old, error
        finally:
            await engine.dispose()

    old, outcome = asyncio.run(scenario())
    if pre_ping:
        assert isinstance(outcome, int), outcome
        assert outcome != old
    else:
        assert isinstance(outcome, DBAPIError), outcome
        assert outcome.connection_invalidated


def test_a_pending_notification_is_no_death(database_url: str) -> None:
    """Something to read on an idle connection that is alive (a ``NOTIFY`` on a channel it
    listens to) costs the round trip, not the connection."""
    engine, sent = engine_for(database_url)

    async def scenario() -> tuple[int, int]:
        try:
            async with engine.connect() as connection:
                await connection.execute(text("listen ast_ping_test"))
                await connection.commit()
                old = int((await connection.execute(text("select pg_backend_pid()"))).scalar_one())
            pg_query(database_url, "select pg_notify('ast_ping_test', 'x')")
            time.sleep(0.2)  # noqa: ASYNC251  # the loop stands still: it waits in the socket
            sent.clear()
            return old, await backend_pid(engine)
        finally:
            await engine.dispose()

    old, new = asyncio.run(scenario())
    assert new == old
    assert sent[0] == "SELECT 1", sent
