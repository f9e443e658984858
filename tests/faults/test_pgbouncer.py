"""PgBouncer in transaction pooling mode, in front of a PostgreSQL that allows few connections.

Real workers on three pools at once (prefork, threads, gevent: 62 runs at a time) share a
PgBouncer whose server pool holds 4 connections, in front of a private PostgreSQL with
``max_connections = 10``. With :func:`~async_session_task.pgbouncer_engine_options` every
run ends as intended; without it, asyncpg's prepared statements fail
(docs/internals.md#pgbouncer-prepared-statements).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery.result import ResultSet
from sqlalchemy import create_engine, event, text

from async_session_task import _ping, pgbouncer_engine_options
from async_session_task._config import Settings
from async_session_task._factory import create_engine as create_async_engine_of
from async_session_task.testing import WorkerProcess, worker_process
from tests.faults.app import Base
from tests.faults.services import PrivatePgBouncer, PrivatePostgres, PrivateRedis, wait_for
from tests.faults.services import pgbouncer_missing as missing
from tests.helpers import unavailable
from tests.soak import app as soak_app
from tests.soak.test_soak import EXPECTED, mix, send

pytestmark = [pytest.mark.services, pytest.mark.timeout(420)]

Bouncer = PrivatePgBouncer[PrivatePostgres]
MAX_CONNECTIONS = 10
SERVER_POOL = 4
#: Pool -> (concurrency, runs): 2,000 runs, 62 at a time, against 4 server connections.
WORKLOAD = {"prefork": (4, 500), "threads": (8, 600), "gevent": (50, 900)}


@pytest.fixture(scope="module")
def pgbouncer(private_redis: PrivateRedis) -> Iterator[Bouncer]:
    unavailable(missing(), "fault test")
    postgres = PrivatePostgres(settings={"max_connections": str(MAX_CONNECTIONS)})
    try:
        engine = create_engine(postgres.url.replace("+asyncpg", "+psycopg"))
        Base.metadata.create_all(engine)
        engine.dispose()
        # PgBouncer's defaults for transaction mode: no DISCARD ALL after each transaction
        # (server_reset_query_always = 0). The preset's unnamed statements must not pile up
        # on the server connections without it (docs/internals.md#pgbouncer-prepared-statements).
        bouncer = PrivatePgBouncer(postgres, pool_size=SERVER_POOL)
        soak_app.app.conf.update(broker_url=private_redis.url, result_backend=private_redis.url)
        try:
            yield bouncer
        finally:
            bouncer.destroy()
    finally:
        postgres.destroy()


class ServerConnections(threading.Thread):
    """Polls PostgreSQL for its client connections (but its own) until stopped."""

    def __init__(self, postgres: PrivatePostgres) -> None:
        super().__init__(daemon=True)
        self.postgres = postgres
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            while not self._stop_event.wait(0.05):
                row = conn.execute(
                    "select count(*) from pg_stat_activity "
                    "where backend_type = 'client backend' and pid <> pg_backend_pid()"
                ).fetchone()
                self.samples += 1
                self.peak = max(self.peak, int(row[0]) if row else 0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


@contextlib.contextmanager
def workers(
    bouncer: Bouncer,
    pools: dict[str, int],
    preset: bool,
    engine_options: dict[str, Any],
) -> Iterator[dict[str, WorkerProcess]]:
    """One real worker per pool, all through ``bouncer``."""
    env = {
        "AST_DATABASE_URL": bouncer.url,
        "AST_BROKER_URL": soak_app.app.conf.broker_url,
        "AST_ENGINE_OPTIONS": json.dumps(engine_options),
        "AST_PGBOUNCER": "1" if preset else "0",
    }
    with contextlib.ExitStack() as stack:
        started = {
            pool: stack.enter_context(
                worker_process(
                    soak_app.app,
                    "tests.soak.app",
                    pool=pool,
                    concurrency=concurrency,
                    env=env,
                    name=f"pgb-{pool}-{uuid.uuid4().hex[:6]}",
                )
            )
            for pool, concurrency in pools.items()
        }
        yield started


def prepared_statements(bouncer: Bouncer) -> dict[int, int]:
    """Server connection -> its prepared statements, seen by one transaction on each."""
    dsn = f"host=127.0.0.1 port={bouncer.port} user=root dbname={bouncer.postgres.database}"
    counts = {}
    with contextlib.ExitStack() as stack:
        # Transactions held open together land on as many server connections.
        for _ in range(bouncer.pool_size):
            conn = stack.enter_context(psycopg.connect(dsn, prepare_threshold=None))
            row = conn.execute(
                "select pg_backend_pid(), count(*) from pg_prepared_statements"
            ).fetchone()
            assert row is not None
            counts[int(row[0])] = int(row[1])
    return counts


def outcome(value: Any) -> str:
    return value if isinstance(value, str) else type(value).__name__


def committed(postgres: PrivatePostgres, prefix: str) -> Counter[str]:
    rows = postgres.query(
        "select split_part(key, ':', 2), count(*) from entries where key like %s group by 1",
        f"{prefix}:%",
    )
    return Counter({kind: int(n) for kind, n in rows})


def test_runs_through_pgbouncer_with_the_preset(
    pgbouncer: Bouncer,
) -> None:
    """2,000 mixed runs, 62 at a time, through 4 server connections: each ends as intended."""
    postgres = pgbouncer.postgres
    prefix = uuid.uuid4().hex[:8]
    wanted: Counter[str] = Counter()
    sent: list[tuple[str, Any]] = []
    sampler = ServerConnections(postgres)
    pools = {pool: concurrency for pool, (concurrency, _) in WORKLOAD.items()}
    with workers(pgbouncer, pools, preset=True, engine_options={}) as started:
        sampler.start()
        for seed, (pool, worker) in enumerate(started.items()):
            kinds = mix(WORKLOAD[pool][1], seed=seed)
            wanted.update(kinds)
            sent += send(worker, prefix, kinds)
        values = ResultSet([r for _, r in sent]).join_native(timeout=360, propagate=False)
        # Ignore stores no result: its runs are done once their rows are all there.
        wait_for(
            lambda: committed(postgres, prefix)["ignore"] >= wanted["ignore"], 60, "Ignore runs"
        )
        sampler.stop()
        for worker in started.values():
            assert worker.stop() == 0

    outcomes = Counter((kind, outcome(v)) for (kind, _), v in zip(sent, values, strict=True))
    print(f"pgbouncer with the preset: {dict(outcomes)}, peak {sampler.peak} server connections")
    assert sum(wanted.values()) == 2000
    for kind, expected in EXPECTED.items():
        assert outcomes[(kind, expected)] == wanted[kind], (kind, outcomes)
    assert not [v for v in values if "prepared statement" in str(v)]
    assert committed(postgres, prefix) == Counter(
        {kind: wanted[kind] for kind, kept in soak_app.KINDS.items() if kept}
    )
    # PgBouncer's server pool, not the 62 clients, bounds PostgreSQL's connections.
    assert sampler.samples > 0
    assert 0 < sampler.peak <= SERVER_POOL < MAX_CONNECTIONS
    assert "too many clients" not in pgbouncer.log
    pools_row = next(p for p in pgbouncer.show("POOLS") if p["database"] == postgres.database)
    assert (pools_row["sv_active"], pools_row["cl_waiting"]) == ("0", "0"), pools_row
    states = postgres.query("select coalesce(state, '') from pg_stat_activity")
    assert not [s for (s,) in states if s.startswith("idle in transaction")]
    statements = prepared_statements(pgbouncer)
    assert len(statements) == SERVER_POOL
    assert set(statements.values()) == {0}, statements


def test_without_the_preset_prepared_statements_fail(
    pgbouncer: Bouncer,
) -> None:
    """The same runs with asyncpg's defaults: statements prepared on one server connection
    are missing from, or already taken on, the next (sqlalchemy/sqlalchemy#6467)."""
    prefix = uuid.uuid4().hex[:8]
    options = {"pool_size": 8, "max_overflow": 0}
    with workers(pgbouncer, {"threads": 8}, preset=False, engine_options=options) as started:
        sent = send(started["threads"], prefix, mix(300, seed=7))
        values = ResultSet([r for _, r in sent]).join_native(timeout=120, propagate=False)
        assert started["threads"].stop() == 0
    failures = Counter(
        next((m for m in ("already exists", "does not exist") if m in str(v)), str(v))
        for v in values
        if "prepared statement" in str(v)
    )
    print(f"pgbouncer without the preset: {len(values)} runs, failed: {dict(failures)}")
    assert sum(failures.values()) > 0, Counter(outcome(v) for v in values)


@pytest.mark.parametrize("idle_ping_after", [0.0, _ping.IDLE_PING_AFTER], ids=["ping", "busy"])
def test_the_pre_ping_through_pgbouncer_with_a_pool_of_client_connections(
    pgbouncer: Bouncer, idle_ping_after: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the preset and a pool of its own (``pool_size``), every session of 200, 8 at a
    time through 4 server connections, gets a working connection: pooled client
    connections returned a moment ago are checked without a round trip (``busy``), and
    with the window at 0 every pooled checkout is pinged with ``SELECT 1``, a simple query
    that prepares nothing (``ping``)."""
    monkeypatch.setattr(_ping, "IDLE_PING_AFTER", idle_ping_after)
    settings = Settings(
        url=pgbouncer.url,
        engine_options=pgbouncer_engine_options(pool_size=3, max_overflow=0),
        session_options={},
        maker=None,
    )
    engine = create_async_engine_of(settings)
    pings: list[str] = []
    connects: list[Any] = []
    invalidated: list[BaseException | None] = []

    @event.listens_for(engine.sync_engine.pool, "invalidate")
    def log_invalidation(dbapi_connection: Any, record: Any, error: BaseException | None) -> None:
        invalidated.append(error)

    @event.listens_for(engine.sync_engine.pool, "connect")
    def log_pings(dbapi_connection: Any, record: Any) -> None:
        connects.append(record)
        dbapi_connection.driver_connection.add_query_logger(
            lambda query: pings.append(query.query) if query.query == "SELECT 1" else None
        )

    async def one(n: int) -> int:
        async with engine.connect() as connection:
            return int((await connection.execute(text("select :n + 0"), {"n": n})).scalar_one())

    async def scenario() -> list[int]:
        try:
            values: list[int] = []
            for start in range(0, 200, 8):
                values += await asyncio.gather(*(one(n) for n in range(start, start + 8)))
            return values
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == list(range(200))
    # No connection was replaced: every ping succeeded, and only the first checkout of each
    # of the pool's 3 connections went unpinged; or, busy, none was pinged.
    assert invalidated == []
    assert len(connects) == 3
    assert len(pings) == (200 - 3 if idle_ping_after == 0 else 0)


def test_a_pgbouncer_restart_costs_no_run(pgbouncer: Bouncer) -> None:
    """Runs before and after a PgBouncer restart, on prefork and threads with the preset:
    client connections the restart closed are found on checkout and replaced, so every run
    commits."""
    base = uuid.uuid4().hex[:8]
    prefixes = [f"{base}{batch}{pool}" for batch in range(2) for pool in ("prefork", "threads")]
    pools = {"prefork": 2, "threads": 8}
    with workers(pgbouncer, pools, preset=True, engine_options={}) as started:
        values: list[Any] = []
        for batch in range(2):
            sent = [
                pair
                for pool, worker in started.items()
                for pair in send(worker, f"{base}{batch}{pool}", ["commit"] * 40)
            ]
            values += ResultSet([r for _, r in sent]).join_native(timeout=120, propagate=False)
            if batch == 0:
                pgbouncer.restart()
        for worker in started.values():
            assert worker.stop() == 0
    assert Counter(map(outcome, values)) == Counter({"commit": 160})
    for prefix in prefixes:
        assert committed(pgbouncer.postgres, prefix) == Counter({"commit": 40}), prefix
