"""The engine options the library adds: ``pool_pre_ping`` by default, and the PgBouncer preset.

Their effect on real servers is tested in tests/faults (a PostgreSQL restart, a PgBouncer in
transaction mode); here, what reaches ``create_async_engine``, and the pool's size on a real
PostgreSQL.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool

from async_session_task import _ping, pgbouncer_engine_options
from async_session_task._config import Settings
from async_session_task._factory import create_engine

URL = "postgresql+asyncpg://app@127.0.0.1:6432/shop"


def settings(options: dict[str, Any]) -> Settings:
    return Settings(url=URL, engine_options=options, session_options={}, maker=None)


def engine_of(options: dict[str, Any], url: str = URL) -> AsyncEngine:
    engine = create_engine(replace(settings(options), url=url))  # connects on first use only
    engine.sync_engine.dispose(close=False)
    return engine


def engine_pool(options: dict[str, Any]) -> Any:
    return engine_of(options).pool


@pytest.mark.parametrize(
    ("options", "pre_ping"),
    [({}, True), ({"pool_size": 2}, True), ({"pool_pre_ping": True}, True),
     ({"pool_pre_ping": False}, False)],
)  # fmt: skip
def test_pool_pre_ping_unless_the_options_say_otherwise(
    options: dict[str, Any], pre_ping: bool
) -> None:
    """On asyncpg the library's one-round-trip ping replaces SQLAlchemy's (tests/test_ping.py)."""
    engine = engine_of(options)
    assert _ping.installed(engine) is pre_ping
    # SQLAlchemy keeps its setting on the pool; there is no public accessor.
    assert engine.pool._pre_ping is False


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://app@127.0.0.1/shop", "sqlite+aiosqlite:///shop.db"]
)
def test_other_drivers_keep_sqlalchemys_pre_ping(url: str) -> None:
    engine = engine_of({}, url)
    assert not _ping.installed(engine)
    assert engine.pool._pre_ping is True


def test_the_preset() -> None:
    options = pgbouncer_engine_options()
    assert "poolclass" not in options
    args = options["connect_args"]
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    # PostgreSQL's unnamed statement: none outlives the next statement on its connection.
    assert args["prepared_statement_name_func"]() == ""
    engine = engine_of(options)
    assert isinstance(engine.pool, AsyncAdaptedQueuePool)
    assert _ping.installed(engine)  # pooled connections a PgBouncer restart closed are found


def test_the_preset_merges_your_options() -> None:
    mine = {
        "echo": True,
        "connect_args": {"server_settings": {"application_name": "shop"}, "timeout": 5},
    }
    options = pgbouncer_engine_options(**mine)
    assert options["echo"] is True
    assert "poolclass" not in options
    assert options["connect_args"]["server_settings"] == {"application_name": "shop"}
    assert options["connect_args"]["timeout"] == 5
    assert options["connect_args"]["statement_cache_size"] == 0
    # Your options are not changed, and each call returns a new dict.
    assert mine["connect_args"] == {"server_settings": {"application_name": "shop"}, "timeout": 5}
    assert pgbouncer_engine_options() == pgbouncer_engine_options()
    assert pgbouncer_engine_options() is not pgbouncer_engine_options()
    assert "echo" not in pgbouncer_engine_options()


def test_the_preset_takes_your_pool() -> None:
    sized = pgbouncer_engine_options(pool_size=4, max_overflow=0)
    assert "poolclass" not in sized
    assert isinstance(engine_pool(sized), AsyncAdaptedQueuePool)
    assert pgbouncer_engine_options(poolclass=NullPool)["poolclass"] is NullPool
    # A connect_args key you give wins over the preset's.
    assert (
        pgbouncer_engine_options(connect_args={"statement_cache_size": 10})["connect_args"][
            "statement_cache_size"
        ]
        == 10
    )


def test_equal_presets_share_one_engine_key() -> None:
    """Two tasks given the preset separately use one engine (one pool) per process."""
    first, second = pgbouncer_engine_options(), pgbouncer_engine_options()
    assert settings(first).engine_key() == settings(second).engine_key()


@pytest.mark.parametrize(
    ("options", "sized"),
    [({}, (15, 0)), ({"pool_size": 2}, (2, 10)), ({"max_overflow": 3}, (5, 3)),
     ({"pool_size": 4, "max_overflow": 1}, (4, 1))],
)  # fmt: skip
def test_the_pool_keeps_what_it_opened_unless_the_options_size_it(
    options: dict[str, Any], sized: tuple[int, int]
) -> None:
    """No size given: 15 connections at most, as SQLAlchemy's 5 + 10, but none of them an
    overflow connection closed on its return; a size given is the user's, whole."""
    pool = engine_pool(options)
    assert (pool.size(), pool._max_overflow) == sized


def test_sqlite_and_a_pool_class_of_ones_own_are_left_alone() -> None:
    assert not isinstance(engine_of({}, "sqlite+aiosqlite:///shop.db").pool, NullPool)
    assert isinstance(engine_pool({"poolclass": NullPool}), NullPool)


@pytest.mark.services
def test_connections_opened_for_concurrent_runs_stay_open(database_url: str) -> None:
    """Twelve sessions at once on a real PostgreSQL: the twelve connections stay in the pool
    for the next runs (with SQLAlchemy's defaults, seven were closed as they came back)."""
    engine = create_engine(replace(settings({}), url=database_url))

    async def main() -> int:
        async def run() -> None:
            async with AsyncSession(engine) as session:
                await session.execute(text("select pg_sleep(0.2)"))

        await asyncio.gather(*(run() for _ in range(12)))
        pool = engine.sync_engine.pool
        assert isinstance(pool, QueuePool)
        kept = pool.checkedin()
        await engine.dispose()
        return kept

    assert asyncio.run(main()) == 12
