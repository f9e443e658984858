"""Exactly-once database effects: idempotent runs keyed by a marker in their own
transaction, and bodies run again after a serialization failure or a deadlock.

In-process runs on SQLite and PostgreSQL show the rules; real workers (Redis and RabbitMQ,
prefork and threads, PostgreSQL directly and through PgBouncer) show the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import before_task_publish
from sqlalchemy import MetaData, create_engine, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.schema import CreateTable

from async_session_task import (
    AsyncSessionTask,
    cleanup_runs,
    current_session,
    on_commit,
    runs_table,
)
from async_session_task._marker import MissingTable
from benchmarks import _pgbouncer
from tests.apps import models, once_app
from tests.apps.models import Account, Note
from tests.helpers import (
    ServiceWorker,
    assert_clean_stop,
    pg_query,
    runtime_stats,
    service_worker,
    unavailable,
)
from tests.test_eager import make_app


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Celery:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'once.db'}"
        engine = create_engine(f"sqlite:///{tmp_path / 'once.db'}")
        models.Base.metadata.create_all(engine)
        engine.dispose()
    else:
        url = request.getfixturevalue("database_url")
    return make_app(url)


async def notes_of(key: str) -> list[str]:
    rows = await current_session().scalars(select(Note.text).where(Note.key == key))
    return list(rows)


def tasks(app: Celery) -> dict[str, Any]:
    @app.task(bind=True, base=AsyncSessionTask, idempotent=True, autocommit=True, shared=False)
    async def charge(self: AsyncSessionTask, key: str, fail: bool = False) -> str:
        self.session.add(Note(key=key, text=self.request.id))
        await self.session.flush()
        if fail:
            raise ValueError("the body failed")
        return str(self.request.id)

    @app.task(
        base=AsyncSessionTask, idempotent=lambda key, **_: f"order:{key}", autocommit=True,
        shared=False,
    )  # fmt: skip
    async def per_order(key: str) -> int:
        current_session().add(Note(key=key, text="charged"))
        return 1

    @app.task(base=AsyncSessionTask, shared=False)
    async def count(key: str) -> list[str]:
        return await notes_of(key)

    return {"charge": charge, "per_order": per_order, "count": count}


def test_a_task_id_runs_once(app: Celery) -> None:
    t = tasks(app)
    key, task_id = uuid.uuid4().hex, uuid.uuid4().hex
    first = t["charge"].apply((key,), task_id=task_id)
    again = t["charge"].apply((key,), task_id=task_id)
    assert first.get() == task_id
    # A redelivery stores no state of its own (Ignore): the first run's result stays.
    assert again.state == "IGNORED"
    assert t["count"].apply((key,)).get() == [task_id]


def test_a_business_key_runs_once_under_two_task_ids(app: Celery) -> None:
    t = tasks(app)
    key = uuid.uuid4().hex
    assert t["per_order"].apply((key,)).get() == 1
    second = t["per_order"].apply((key,))
    assert second.state == "SUCCESS"  # skipped, not failed
    assert second.get() is None
    assert t["count"].apply((key,)).get() == ["charged"]


def test_a_failed_body_rolls_its_marker_back(app: Celery) -> None:
    t = tasks(app)
    key, task_id = uuid.uuid4().hex, uuid.uuid4().hex
    failed = t["charge"].apply((key,), {"fail": True}, task_id=task_id)
    assert isinstance(failed.result, ValueError)
    assert t["charge"].apply((key,), task_id=task_id).get() == task_id  # runs: no marker
    assert t["count"].apply((key,)).get() == [task_id]


def test_a_second_commit_of_an_idempotent_run_fails(app: Celery) -> None:
    @app.task(bind=True, base=AsyncSessionTask, idempotent=True, shared=False)
    async def twice(self: AsyncSessionTask, key: str) -> None:
        self.session.add(Note(key=key, text="first"))
        await self.session.commit()
        self.session.add(Note(key=key, text="second"))
        await self.session.commit()

    key = uuid.uuid4().hex
    result = twice.apply((key,))
    assert isinstance(result.result, InvalidRequestError)
    assert "one transaction" in str(result.result)
    assert tasks(app)["count"].apply((key,)).get() == ["first"]


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"idempotent": "yes"}, TypeError, "idempotent must be True"),
        ({"isolation_level": "SERIAL"}, ValueError, "isolation_level must be one of"),
        ({"retry_on_conflict": -1}, ValueError, "an int >= 0"),
        ({"retry_on_conflict": True}, ValueError, "an int >= 0"),
    ],
)
def test_bad_options_fail_where_the_task_is_declared(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], says: str
) -> None:
    app = make_app(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")

    async def bad() -> None: ...

    with pytest.raises(error, match=says):
        app.task(base=AsyncSessionTask, shared=False, lazy=False, **options)(bad)


def test_a_key_that_is_not_a_string_fails_the_run(tmp_path: Path) -> None:
    app = make_app(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")

    @app.task(base=AsyncSessionTask, idempotent=lambda n: n, shared=False)
    async def numbered(n: int) -> None: ...

    result = numbered.apply((7,))
    assert isinstance(result.result, TypeError)
    assert "non-empty str" in str(result.result)


def test_a_missing_table_says_what_to_do(tmp_path: Path) -> None:
    app = make_app(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    result = tasks(app)["charge"].apply(("k",))
    assert isinstance(result.result, MissingTable)
    assert "runs_table(Base.metadata)" in str(result.result)


def test_cleanup_removes_only_old_markers(app: Celery) -> None:
    t = tasks(app)
    keys = [uuid.uuid4().hex for _ in range(3)]
    for key in keys:
        t["charge"].apply((key,))

    async def cleanup() -> tuple[int, int]:
        engine = create_async_engine(app.conf.async_session_url)
        try:
            kept = await cleanup_runs(engine)  # the default: 7 days
            async with engine.connect() as conn:
                deleted = await cleanup_runs(conn, older_than=datetime.timedelta(seconds=-60))
            return kept, deleted
        finally:
            await engine.dispose()

    kept, deleted = asyncio.run(cleanup())
    assert kept == 0
    assert deleted >= 3


def test_runs_table_is_the_documented_ddl() -> None:
    table = runs_table(MetaData())
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
    ddl = str(CreateTable(table).compile(dialect=dialect))
    expected = (
        "key VARCHAR(255) NOT NULL",
        "created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL",
        "PRIMARY KEY (key)",
    )
    for line in expected:
        assert line in ddl, ddl
    assert [index.name for index in table.indexes] == ["ix_async_session_runs_created_at"]


def test_a_serialization_failure_runs_the_body_again(database_url: str) -> None:
    """A real 40001: after the body read a balance, another transaction changes it."""
    app = make_app(database_url)
    account = uuid.uuid4().hex
    pg_query(database_url, "insert into accounts values (%s, 10) returning id", account)
    seen: list[int] = []

    @app.task(
        bind=True, base=AsyncSessionTask, isolation_level="SERIALIZABLE", retry_on_conflict=2,
        autocommit=True, shared=False,
    )  # fmt: skip
    async def add_one(self: AsyncSessionTask) -> int:
        row = await self.session.get(Account, account)
        assert row is not None
        seen.append(row.balance)
        if len(seen) == 1:  # the first attempt: someone else writes the same row
            await asyncio.to_thread(
                pg_query,
                database_url,
                "update accounts set balance = 100 where id = %s returning id",
                account,
            )
        row.balance += 1
        await self.session.flush()
        return row.balance

    assert add_one.apply().get() == 101
    assert seen == [10, 100]
    assert pg_query(database_url, "select balance from accounts where id = %s", account) == [(101,)]


def test_without_retries_the_conflict_is_raised(database_url: str) -> None:
    app = make_app(database_url)
    account = uuid.uuid4().hex
    pg_query(database_url, "insert into accounts values (%s, 10) returning id", account)

    @app.task(
        bind=True, base=AsyncSessionTask, isolation_level="REPEATABLE READ", autocommit=True,
        shared=False,
    )  # fmt: skip
    async def add_one(self: AsyncSessionTask) -> None:
        level = await self.session.scalar(text("show transaction_isolation"))
        assert level == "repeatable read"
        row = await self.session.get(Account, account)
        assert row is not None
        await asyncio.to_thread(
            pg_query,
            database_url,
            "update accounts set balance = 100 where id = %s returning id",
            account,
        )
        row.balance += 1

    result = add_one.apply()
    assert "could not serialize" in str(result.result)


# Real workers: the guarantees under real redelivery, concurrency and conflicts.

ONCE_APP = "tests.apps.once_app"


@pytest.fixture(params=["direct", "pgbouncer"])
def through(request: pytest.FixtureRequest, database_url: str) -> Iterator[dict[str, Any]]:
    """Worker options reaching the test database directly, or through a real PgBouncer in
    transaction pooling mode."""
    if request.param == "direct":
        yield {}
        return
    unavailable(_pgbouncer.missing())
    with _pgbouncer.PgBouncer(5432, make_url(database_url).database or "", pool_size=4) as bouncer:
        yield {"database_url": bouncer.url, "env": {"AST_PGBOUNCER": "1"}}


@contextlib.contextmanager
def once_worker(
    database_url: str, through: dict[str, Any], **options: Any
) -> Iterator[ServiceWorker]:
    env = {**through.get("env", {}), **options.pop("env", {})}
    url = through.get("database_url", database_url)
    with service_worker(url, module=ONCE_APP, env=env, **options) as worker:
        yield worker


def notes_by(database_url: str, key: str) -> list[str]:
    rows = pg_query(database_url, "select text from notes where key = %s order by id", key)
    return [row[0] for row in rows]


def accounts(database_url: str, *names: str) -> list[int]:
    rows = dict(
        pg_query(database_url, "select id, balance from accounts where id = any(%s)", list(names))
    )
    return [rows[name] for name in names]


def open_accounts(database_url: str, balance: int, count: int) -> list[str]:
    names = [uuid.uuid4().hex for _ in range(count)]
    for name in names:
        pg_query(database_url, "insert into accounts values (%s, %s) returning id", name, balance)
    return names


@pytest.mark.services
def test_one_task_id_sent_twice_at_once_has_one_effect(
    database_url: str, through: dict[str, Any]
) -> None:
    with once_worker(database_url, through, pool="threads", concurrency=4) as worker:
        key, task_id = uuid.uuid4().hex, uuid.uuid4().hex
        results = [worker.send(once_app.charge, key, 0.5, task_id=task_id) for _ in range(2)]
        assert results[0].get(timeout=30) == task_id
        worker.wait_for_log("skipped")
        assert notes_by(database_url, key) == [task_id]
        log = worker.worker.log
        assert f"skipped: its key {task_id!r} was run already by {task_id}" in log, log[-3000:]
        # A threads worker runs its bodies in its main process, which answers inspect.
        assert runtime_stats(worker.worker.app, worker)["skipped_runs"] == 1
        if not through:  # PgBouncer keeps its server connections after the worker stops
            assert_clean_stop(worker)


@pytest.mark.services
def test_a_business_key_under_two_task_ids_has_one_effect(
    database_url: str, through: dict[str, Any]
) -> None:
    with once_worker(database_url, through, pool="threads", concurrency=4) as worker:
        key = uuid.uuid4().hex
        sent = [worker.send(once_app.charge_per_order, key, 0.3) for _ in range(2)]
        returned = sorted([result.get(timeout=30) for result in sent], key=str)
        # One ran and returned its id; the other was skipped (None), concurrent or later.
        ran = [value for value in returned if value is not None]
        assert len(ran) == 1
        assert notes_by(database_url, key) == ran
        assert f"skipped: its key 'order:{key}'" in worker.worker.log


@pytest.mark.services
def test_a_child_killed_after_commit_is_redelivered_and_skipped(database_url: str) -> None:
    """RabbitMQ, prefork, ``acks_late`` and ``reject_on_worker_lost``: the body commits, its
    child exits before the ack, the message comes again, and its run is skipped."""
    with service_worker(
        database_url, module=ONCE_APP, pool="prefork", concurrency=1, broker="amqp"
    ) as worker:
        key = uuid.uuid4().hex
        result = worker.send(once_app.commit_then_die, key)
        log = worker.wait_for_log("skipped: its key")
        assert f"skipped: its key {result.id!r} was run already by {result.id}" in log
        assert "WorkerLostError" in log or "exited prematurely" in log, log[-3000:]
        assert len(notes_by(database_url, key)) == 1


@pytest.mark.services
def test_serializable_transfers_are_exact_and_deadlocks_complete(
    database_url: str, through: dict[str, Any]
) -> None:
    names = open_accounts(database_url, 1000, 4)
    with once_worker(database_url, through, pool="threads", concurrency=8) as worker:
        sent = [
            worker.send(once_app.transfer, names[i % 4], names[(i + 1) % 4], i + 1)
            for i in range(20)
        ]
        attempts = [result.get(timeout=60) for result in sent]
        # Each transfer i moves i + 1 from account i % 4 to the next.
        expected = [1000] * 4
        for i in range(20):
            expected[i % 4] -= i + 1
            expected[(i + 1) % 4] += i + 1
        assert accounts(database_url, *names) == expected
        assert max(attempts) > 1, attempts  # some ran again after a serialization failure

        first, second = open_accounts(database_url, 0, 2)
        both = [
            worker.send(once_app.lock_both, first, second, 0.5),
            worker.send(once_app.lock_both, second, first, 0.5),
        ]
        tries = sorted(result.get(timeout=60) for result in both)
        assert tries == [1, 2]  # PostgreSQL aborted one (40P01); it ran again
        assert accounts(database_url, first, second) == [2, 2]
        stats = runtime_stats(worker.worker.app, worker)
        assert stats["conflict_reruns"] >= sum(attempts) - 20 + 1
        assert "deadlock (40P01) in attempt 1" in worker.worker.log


def test_sqlite_isolation_begins_at_the_first_statement_on_its_own_engine(tmp_path: Path) -> None:
    """On SQLite a SERIALIZABLE task takes the write lock (BEGIN IMMEDIATE) at its first read;
    a task without isolation_level on the same engine keeps the driver's own behaviour."""
    path = tmp_path / "iso.db"
    app = make_app(f"sqlite+aiosqlite:///{path}")

    def locked() -> bool:
        """Whether another connection is refused the write lock right now."""
        with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other:
            try:
                other.execute("begin immediate")
            except sqlite3.OperationalError:
                return True
            other.execute("rollback")
            return False

    async def read_then_look() -> bool:
        await current_session().execute(text("select 1"))
        return await asyncio.to_thread(locked)

    isolated = app.task(base=AsyncSessionTask, isolation_level="SERIALIZABLE", shared=False)(
        read_then_look
    )
    plain = app.task(base=AsyncSessionTask, shared=False, name="plain")(read_then_look)
    assert isolated.apply().get() is True
    assert plain.apply().get() is False


class Conflict(Exception):
    """What a driver raises for a serialization failure, as far as ``retry_on_conflict``
    looks: an error with that SQLSTATE."""

    sqlstate = "40001"


def test_attempts_run_out_with_the_original_error(app: Celery) -> None:
    calls: list[int] = []

    @app.task(base=AsyncSessionTask, retry_on_conflict=2, shared=False)
    async def always() -> None:
        calls.append(1)
        raise Conflict("could not serialize access")

    result = always.apply()
    assert isinstance(result.result, Conflict)  # as is, so autoretry_for still applies
    assert len(calls) == 3


def test_a_failed_attempt_drops_what_it_queued_on_commit(app: Celery) -> None:
    published: list[str] = []

    def record(headers: Any = None, **_: Any) -> None:
        published.append(headers["id"])

    @app.task(shared=False)
    def notify(n: int) -> None: ...

    @app.task(bind=True, base=AsyncSessionTask, retry_on_conflict=1, shared=False)
    async def queue_then_conflict(self: AsyncSessionTask) -> str:
        result = on_commit(notify.s(len(attempts)), session=self.session)
        attempts.append(result.id)
        if len(attempts) == 1:
            raise Conflict("could not serialize access")
        await self.session.commit()
        return str(result.id)

    attempts: list[str] = []
    before_task_publish.connect(record, weak=False)
    try:
        kept = queue_then_conflict.apply().get()
    finally:
        before_task_publish.disconnect(record)
    assert len(attempts) == 2
    assert published == [kept]
    assert kept == attempts[1]


def test_retry_keeps_the_key_and_runs_again(app: Celery) -> None:
    @app.task(bind=True, base=AsyncSessionTask, idempotent=True, autocommit=True, shared=False)
    async def flaky(self: AsyncSessionTask, key: str) -> int:
        current_session().add(Note(key=key, text=str(self.request.retries)))
        if self.request.retries == 0:
            raise self.retry(countdown=0)  # the marker rolls back with the attempt
        return int(self.request.retries)

    key = uuid.uuid4().hex
    assert flaky.apply((key,)).get() == 1
    assert tasks(app)["count"].apply((key,)).get() == ["1"]


@pytest.mark.services
def test_the_soft_time_limit_spans_all_attempts(database_url: str) -> None:
    with service_worker(database_url, module=ONCE_APP, pool="threads", concurrency=2) as worker:
        result = worker.send(once_app.conflicts_forever)
        with pytest.raises(SoftTimeLimitExceeded):
            result.get(timeout=30)
        reruns = runtime_stats(worker.worker.app, worker)["conflict_reruns"]
        assert reruns >= 5  # it ran again and again, within the one limit
