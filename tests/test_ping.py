"""The pre-ping of asyncpg engines built from ``async_session_url``: one round trip
(``SELECT 1``) when a run takes a pooled connection, none for a new one, and a dead
connection replaced before a session sees it. On a real PostgreSQL; the same default on real
workers through a server restart is in tests/faults/test_postgres.py.
"""

from __future__ import annotations

import asyncio
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


def test_a_pooled_connection_is_pinged_in_one_round_trip(database_url: str) -> None:
    engine, sent = engine_for(database_url)
    assert _ping.installed(engine)
    assert engine.sync_engine.pool._pre_ping is False  # SQLAlchemy's three round trips: off

    async def scenario() -> tuple[list[str], list[str]]:
        try:
            await backend_pid(engine)  # a new connection: no ping
            first = sent[:]
            sent.clear()
            await backend_pid(engine)  # the same connection, from the pool
            return first, sent[:]
        finally:
            await engine.dispose()

    first, pooled = asyncio.run(scenario())
    # asyncpg's query logger shows what is sent as a simple query, not prepared statements:
    # SQLAlchemy's own ping would show "BEGIN;", "ROLLBACK;" before the run's transaction.
    assert first == ["BEGIN;", "ROLLBACK;"], first
    assert pooled == ["SELECT 1", "BEGIN;", "ROLLBACK;"], pooled


@pytest.mark.parametrize("pre_ping", [True, False], ids=["default", "pool_pre_ping=False"])
def test_a_dead_pooled_connection(database_url: str, pre_ping: bool) -> None:
    """Killed between two runs: with the ping, replaced unseen; without it, the run fails."""
    options = {} if pre_ping else {"pool_pre_ping": False}
    engine, _ = engine_for(database_url, **options)

    async def scenario() -> int | BaseException:
        try:
            old = await backend_pid(engine)
            rows = pg_query(database_url, "select pg_terminate_backend(%s)", old)
            assert rows == [(True,)]
            try:
                return await backend_pid(engine)
            except DBAPIError as error:
                return error
        finally:
            await engine.dispose()

    outcome = asyncio.run(scenario())
    if pre_ping:
        assert isinstance(outcome, int), outcome
    else:
        assert isinstance(outcome, DBAPIError), outcome
        assert outcome.connection_invalidated
