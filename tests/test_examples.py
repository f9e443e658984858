"""Every example in ``examples/``, on real workers: SQLite with a filesystem broker (no server),
and PostgreSQL with Redis.

The examples read their database and broker from ``EXAMPLES_*`` variables at import; the test
process talks to their workers through a client app with the same broker and result backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import MetaData, create_engine, text

from async_session_task.testing import WorkerProcess, file_broker_settings, worker_process
from tests.helpers import (
    BROKERS,
    SERVICES_OPTIONAL,
    HTTPServer,
    require,
    run_python,
    wait_for_state,
)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
REDIS = "redis://127.0.0.1:6379/0"
WAIT = 90

pytestmark = pytest.mark.timeout(180)


@dataclass
class Variant:
    """One way to run the examples: their environment, and a client app to reach them."""

    backend: str
    database_url: str
    env: dict[str, str]
    client: Celery

    def create_tables(self, metadata: MetaData) -> None:
        engine = create_engine(sync_url(self.database_url))
        metadata.create_all(engine)
        engine.dispose()

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(sync_url(self.database_url))
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params))
        finally:
            engine.dispose()

    @contextlib.contextmanager
    def worker(
        self, module: str, pool: str = "threads", env: dict[str, str] | None = None
    ) -> Iterator[WorkerProcess]:
        """``celery -A module worker`` whose default queue is its own (for chords, retries)."""
        name = uuid.uuid4().hex[:12]
        env = {
            **self.env,
            **(env or {}),
            "EXAMPLES_QUEUE": f"q-{name}",
            "PYTHONPATH": pythonpath(),
        }
        with worker_process(
            self.client, module, pool=pool, concurrency=4, env=env, name=name
        ) as worker:
            yield worker
            assert worker.stop() == 0, worker.log[-3000:]
            assert worker.shutdown_problems() == [], worker.log[-3000:]

    def send(self, worker: WorkerProcess, name: str, *args: Any) -> Any:
        return self.client.send_task(name, args, queue=worker.queue)

    def run_module(self, module: str, worker: WorkerProcess) -> Any:
        """``python3 -m module`` next to the worker; its last line of output, as JSON."""
        env = {**os.environ, **self.env, "EXAMPLES_QUEUE": worker.queue, "PYTHONPATH": pythonpath()}
        process = run_python("-m", module, env=env, timeout=WAIT)
        assert process.returncode == 0, process.stdout + process.stderr + worker.log[-3000:]
        return json.loads(process.stdout.strip().splitlines()[-1])


def sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def sqlite_variant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Variant]:
    state = tmp_path_factory.mktemp("examples")
    client = Celery("examples-client", set_as_current=False)
    client.conf.update(file_broker_settings(state))
    url = f"sqlite+aiosqlite:///{state / 'examples.db'}"
    yield Variant("sqlite", url, {"EXAMPLES_STATE_DIR": str(state)}, client)
    client.close()


@pytest.fixture(scope="session")
def postgresql_variant(database_url: str) -> Iterator[Variant]:
    client = Celery("examples-client", broker=REDIS, backend=REDIS, set_as_current=False)
    env = {"EXAMPLES_DATABASE_URL": database_url, "EXAMPLES_BROKER_URL": REDIS}
    yield Variant("postgresql", database_url, env, client)
    client.close()


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    return request.getfixturevalue(f"{request.param}_variant")  # type: ignore[no-any-return]


def test_shop_tasks_share_the_web_apps_sessionmaker(variant: Variant) -> None:
    """The web side places three orders (its own loop and engine); the worker confirms them
    with the same SessionLocal and repository: 5 in stock, 2 + 2 confirmed, 1 rejected."""
    with variant.worker("examples.shop.tasks") as worker:
        report = variant.run_module("examples.shop", worker)
    assert [order["status"] for order in report["placed"]] == ["pending"] * 3
    assert sorted(report["final"]) == ["confirmed", "confirmed", "rejected"]
    stock = variant.query("select stock from shop_products where sku = :sku", sku=report["sku"])
    assert stock == [(1,)]


def test_retrying_backs_off_while_the_table_is_locked(variant: Variant) -> None:
    """A real lock held by another connection makes the first attempt fail; once released,
    a retry (with a new session) commits."""
    from examples import retrying

    variant.create_tables(retrying.Base.metadata)
    sku = uuid.uuid4().hex[:12]
    with variant.worker("examples.retrying") as worker:
        with hold_lock(variant, sku):
            result = variant.send(worker, "examples.retrying.restock", sku, 5)
            wait_for_state(result, "RETRY")
        report = result.get(timeout=WAIT)
    assert report["sku"] == sku
    assert report["retries"] >= 1
    rows = variant.query("select quantity from retrying_stock where sku = :sku", sku=sku)
    assert rows == [(15,)]


def test_running_once_charges_an_order_once_and_transfers_exactly(variant: Variant) -> None:
    """Three messages for one order: one payment. Ten concurrent transfers under
    SERIALIZABLE: exact balances (conflicts ran again)."""
    from examples import running_once

    variant.create_tables(running_once.Base.metadata)
    order, source, target = (uuid.uuid4().hex[:12] for _ in range(3))
    engine = create_engine(sync_url(variant.database_url))
    with engine.begin() as connection:
        for account in (source, target):
            connection.execute(text("insert into once_accounts values (:id, 100)"), {"id": account})
    engine.dispose()
    name = "examples.running_once"
    with variant.worker(name) as worker:
        charges = [variant.send(worker, f"{name}.charge", order, source, 30) for _ in range(3)]
        balances = [result.get(timeout=WAIT) for result in charges]
        assert sorted(balances, key=str) == [70, None, None]  # two were skipped
        sent = [variant.send(worker, f"{name}.transfer", source, target, 1) for _ in range(10)]
        for result in sent:
            result.get(timeout=WAIT)
        # The markers stay for the retention; a cleanup with none deletes them all.
        assert variant.send(worker, f"{name}.cleanup").get(timeout=WAIT) == 0
        assert variant.send(worker, f"{name}.cleanup", -1).get(timeout=WAIT) >= 1
        assert variant.send(worker, f"{name}.charge", order, source, 30).get(timeout=WAIT) == 30
    # Charged twice in all: the order's marker was deleted, and its next message ran.
    payments = variant.query("select count(*) from once_payments where order_id = :o", o=order)
    assert payments == [(2,)]
    rows = variant.query(
        "select balance from once_accounts where id in (:s, :t) order by id = :t",
        s=source,
        t=target,
    )
    assert rows == [(30,), (110,)]


def test_outbox_delivers_an_order_placed_while_the_broker_was_down(variant: Variant) -> None:
    """One order is published right after its commit; the other, committed while its broker
    refused, is delivered by the worker's relay: both are processed, once."""
    with variant.worker("examples.outbox") as worker:
        report = variant.run_module("examples.outbox", worker)
        orders = report["placed"] + report["relayed"]
        query = "select status from outbox_orders where id in ({})".format(
            ", ".join(str(int(order)) for order in orders)
        )
        deadline = time.monotonic() + WAIT
        while variant.query(query) != [("processed",), ("processed",)]:
            assert time.monotonic() < deadline, worker.log[-3000:]
            worker.ping(timeout=0.2)  # the pause between looks, and a sign of life
        assert variant.query("select count(*) from async_session_outbox") == [(0,)]
        assert "dead letter" not in worker.log


@contextlib.contextmanager
def hold_lock(variant: Variant, sku: str) -> Iterator[None]:
    """Create the stock row, then lock it (SQLite: the whole database) until exit."""
    if variant.backend == "sqlite":
        path = variant.database_url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
            connection.execute("insert into retrying_stock values (?, 10)", (sku,))
            connection.execute("begin immediate")  # the write lock, held
            try:
                yield
            finally:
                connection.execute("rollback")
        return
    dsn = variant.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("insert into retrying_stock values (%s, 10)", (sku,))
    with psycopg.connect(dsn) as connection:
        connection.execute("select 1 from retrying_stock where sku = %s for update", (sku,))
        try:
            yield
        finally:
            connection.rollback()


def test_soft_time_limit_keeps_committed_batches(variant: Variant) -> None:
    """Prefork: the body is cancelled at its await; committed batches stay, the batch in
    progress is rolled back, the connection is not left in a transaction."""
    from examples import time_limits

    variant.create_tables(time_limits.Base.metadata)
    job = uuid.uuid4().hex[:12]
    with variant.worker("examples.time_limits", pool="prefork") as worker:
        result = variant.send(worker, "examples.time_limits.import_rows", job, 50, 0.1)
        with pytest.raises(SoftTimeLimitExceeded):
            result.get(timeout=WAIT)
        rows = variant.query("select count(*) from time_limits_rows where job = :j", j=job)
        imported = rows[0][0]
        assert 0 < imported < 50 * time_limits.BATCH
        assert imported % time_limits.BATCH == 0
        if variant.backend == "postgresql":
            states = variant.query(
                "select state from pg_stat_activity"
                " where datname = current_database() and pid <> pg_backend_pid()"
            )
            assert ("idle in transaction",) not in states, states
        # The same worker process goes on: a short job finishes.
        assert variant.send(worker, "examples.time_limits.import_rows", job, 2, 0).get(
            timeout=WAIT
        ) == (2 * time_limits.BATCH)


def test_fanout_chord_gathers_every_result(variant: Variant) -> None:
    with variant.worker("examples.fanout") as worker:
        report = variant.run_module("examples.fanout", worker)
    expected = sum(user * user % 97 for user in range(1, 51))
    assert report["users"] == 50
    assert report["total"] == report["stored"] == expected
    rows = variant.query(
        "select users, total from fanout_summaries where run = :r", r=report["run"]
    )
    assert rows == [(50, expected)]


@contextlib.contextmanager
def serve(variant: Variant, worker: WorkerProcess, target: str) -> Iterator[str]:
    """``uvicorn target`` on a free port, next to the worker; yields its base URL."""
    env = {**os.environ, **variant.env, "EXAMPLES_QUEUE": worker.queue, "PYTHONPATH": pythonpath()}
    log = Path(worker.log_path.parent, "uvicorn.log")
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", target, "--port", "0", "--no-access-log"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + WAIT
        while not (started := re.search(r"Uvicorn running on (http://\S+)", log.read_text())):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield started.group(1)
    finally:
        server.terminate()
        server.wait(WAIT)


async def post_orders(base_url: str, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=WAIT) as client:
        responses = await asyncio.gather(
            *(client.post("/orders", json={"item": f"item-{i}"}) for i in range(count))
        )
    for response in responses:
        assert response.status_code == 201, response.text
    return [response.json() for response in responses]


async def post_process(base_url: str, ids: list[int]) -> list[dict[str, Any]]:
    """``POST /orders/{id}/process`` for every id at once."""
    async with httpx.AsyncClient(base_url=base_url, timeout=WAIT) as client:
        responses = await asyncio.gather(*(client.post(f"/orders/{i}/process") for i in ids))
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json() for response in responses]


def test_fastapi_orders_worker_finds_every_order(variant: Variant) -> None:
    """Over HTTP, uvicorn serving the app: 20 orders posted at once, each handler queueing its
    task with on_commit; the worker finds every order (get_one() raises otherwise)."""
    with (
        variant.worker("examples.fastapi_orders.tasks") as worker,
        serve(variant, worker, "examples.fastapi_orders.web:app") as base_url,
    ):
        orders = asyncio.run(post_orders(base_url, 20))
        statuses = [
            variant.client.AsyncResult(order["task_id"]).get(timeout=WAIT) for order in orders
        ]
        assert statuses == ["processed"] * 20
        assert [order["status"] for order in orders] == ["received"] * 20
        read = httpx.get(f"{base_url}/orders/{orders[0]['id']}", timeout=WAIT).json()
        assert read["status"] == "processed"
        # adelay + aget in a handler, 200 requests at once (on PostgreSQL and Redis; 20 on
        # the embedded default): each answer comes back over HTTP.
        count = 200 if variant.backend == "postgresql" else 20
        ids = [orders[i % len(orders)]["id"] for i in range(count)]
        again = asyncio.run(post_process(base_url, ids))
        assert [reply["status"] for reply in again] == ["processed"] * count
        assert len({reply["task_id"] for reply in again}) == count


@pytest.mark.services
@pytest.mark.parametrize("results", ["redis", "rpc"])
def test_fastapi_orders_on_rabbitmq(database_url: str, results: str) -> None:
    """RabbitMQ as the broker, results in Redis or sent back as rpc:// replies to the web
    process: 200 requests at once, each sending with adelay and waiting with aget."""
    require("RabbitMQ", SERVICES_OPTIONAL["RabbitMQ"])
    backend = REDIS if results == "redis" else "rpc://"
    client = Celery("examples-client", broker=BROKERS["amqp"], backend=REDIS)
    env = {
        "EXAMPLES_DATABASE_URL": database_url,
        "EXAMPLES_BROKER_URL": BROKERS["amqp"],
        "EXAMPLES_RESULT_BACKEND": backend,
    }
    variant = Variant("postgresql", database_url, env, client)
    with (
        variant.worker("examples.fastapi_orders.tasks") as worker,
        serve(variant, worker, "examples.fastapi_orders.web:app") as base_url,
    ):
        orders = asyncio.run(post_orders(base_url, 20))
        ids = [orders[i % len(orders)]["id"] for i in range(200)]
        replies = asyncio.run(post_process(base_url, ids))
    client.close()
    assert [reply["id"] for reply in replies] == ids
    assert [reply["status"] for reply in replies] == ["processed"] * 200
    assert len({reply["task_id"] for reply in replies}) == 200


@pytest.mark.services
def test_lifespan_clients_are_shared_by_the_runs(
    postgresql_variant: Variant, http_server: HTTPServer
) -> None:
    """Eight runs at once on a threads worker use one HTTP client and one Redis client; the
    page is fetched once, then read from Redis; the worker stops with nothing left open."""
    from examples import lifespan

    variant = postgresql_variant
    variant.create_tables(lifespan.Base.metadata)
    path = f"/slow?delay=0.2&page={uuid.uuid4().hex}"
    env = {"EXAMPLES_HTTP_URL": http_server.url}
    with variant.worker("examples.lifespan", env=env) as worker:
        first = variant.send(worker, "examples.lifespan.record_page", path).get(timeout=WAIT)
        results = [variant.send(worker, "examples.lifespan.record_page", path) for _ in range(8)]
        reports = [result.get(timeout=WAIT) for result in results]
    assert {report["status"] for report in [first, *reports]} == {200}
    assert len({report["http_client"] for report in [first, *reports]}) == 1
    assert http_server.requests == 1  # the other runs found it in Redis
    rows = variant.query("select status from lifespan_pages where path = :p", p=path)
    assert rows == [(200,)]


def test_no_examples_left_untested() -> None:
    """Each module in examples/ has a test here (or in test_demo.py)."""
    tested = {
        "demo",
        "settings",
        "shop",
        "retrying",
        "time_limits",
        "fanout",
        "fastapi_orders",
        "lifespan",
        "running_once",
        "outbox",
    }
    found = {p.stem for p in (ROOT / "examples").iterdir() if p.stem != "__init__"}
    found.discard("__pycache__")
    assert found <= tested, found - tested
