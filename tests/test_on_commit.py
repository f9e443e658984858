"""``on_commit``: messages leave when the outermost transaction commits, and only then.

Bodies run in real workers (PostgreSQL through asyncpg, Redis; RabbitMQ for the race); the
web side runs in this process, with its own engine on an ``asyncio.run()`` loop. Messages go
to a hold queue that no worker consumes (``tests/apps/oncommit_app.py``): reading it shows
what was published, in which order, and when.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from async_session_task import AsyncSessionTask, on_commit
from async_session_task._on_commit import publish_failures
from async_session_task.testing import rollback_sessions
from tests.apps import oncommit_app as tasks
from tests.apps.models import Note
from tests.apps.pg_app import count_notes
from tests.helpers import (
    BROKERS,
    ServiceWorker,
    client_app,
    pg_query,
    runtime_stats,
    service_worker,
    wait_for_state,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

WAIT = 60


def held(queue: str, key: str) -> list[tuple[str, str]]:
    """(label, task id) of the messages for ``key`` in the hold queue, oldest first."""
    client = redis.Redis.from_url(BROKERS["redis"])
    raw = client.lrange(queue, 0, -1)
    client.close()
    found = []
    for item in reversed(raw):  # kombu pushes on the left and pops on the right
        message = json.loads(item)
        args = json.loads(base64.b64decode(message["body"]))[0]
        if args[0] == key:
            found.append((args[1] if len(args) > 1 else "", message["headers"]["id"]))
    return found


def labels(queue: str, key: str) -> list[str]:
    return [label for label, _ in held(queue, key)]


@contextlib.contextmanager
def holding(database_url: str, key: str) -> Iterator[None]:
    """Hold the advisory lock a body waits for in ``wait_for_test``, until the block ends."""
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("select pg_advisory_lock(hashtext(%s))", (key,))
        try:
            yield
        finally:
            connection.execute("select pg_advisory_unlock(hashtext(%s))", (key,))


def key() -> str:
    return uuid.uuid4().hex


def in_order(
    worker: Any, hold_queue: str, database_url: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """Run ``tasks.in_order`` on ``worker``: nothing may leave while its transaction is held
    open; then the ids its calls returned, and the messages published, in order."""
    k = key()
    with holding(database_url, k):
        result = worker.send(tasks.in_order, k)
        wait_for_state(result, "QUEUED")
        assert held(hold_queue, k) == []
    return result.get(timeout=WAIT), held(hold_queue, k)


@pytest.fixture(scope="module")
def hold_queue() -> Iterator[str]:
    name = f"hold-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(BROKERS["redis"])
    client.delete(name)
    client.close()


@pytest.fixture(scope="module")
def worker(database_url: str, hold_queue: str) -> Iterator[ServiceWorker]:
    """One threads worker for the module: bodies publish through the worker's threads."""
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "create table if not exists oncommit_deferred (k text,"
            " constraint oncommit_deferred_k unique (k) deferrable initially deferred)"
        )
    with service_worker(
        database_url,
        pool="threads",
        concurrency=4,
        module="tests.apps.oncommit_app",
        env={"AST_HOLD_QUEUE": hold_queue},
    ) as started:
        yield started
        assert started.worker.stop() == 0
        assert started.worker.shutdown_problems() == [], started.worker.log[-3000:]


def test_published_after_the_commit_in_order(
    worker: ServiceWorker, hold_queue: str, database_url: str
) -> None:
    """1: on_commit, delay_on_commit, apply_async_on_commit, a chain, a group: nothing while
    the transaction is open; then all, in order, with the ids the calls returned."""
    ids, messages = in_order(worker, hold_queue, database_url)
    assert [label for label, _ in messages] == ["1", "2", "3", "4a", "5a", "5b"]
    assert [task_id for _, task_id in messages] == ids


def test_failed_commit_publishes_nothing(worker: ServiceWorker, hold_queue: str) -> None:
    """2: a deferred unique violation at COMMIT, a connection dropped before it: nothing of
    that transaction leaves, nor leaks into the session's next one."""
    for how in ("deferred", "dropped"):
        k = key()
        error = worker.send(tasks.failed_commit, k, how).get(timeout=WAIT)
        assert error.startswith("DBAPIError:"), (how, error)
        assert labels(hold_queue, k) == ["after"], how


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("rollback", ["next"]),
        ("close", ["next"]),
        ("error", []),
        ("retry", ["retry-1"]),
        ("ignore", []),
        ("reject", []),
        ("soft_limit", []),
    ],
)
def test_discarded_transactions_publish_nothing(
    worker: ServiceWorker, hold_queue: str, how: str, expected: list[str]
) -> None:
    """3: rollback, close() without commit, an exception, a retry, Ignore, Reject, a soft time
    limit: what the discarded transaction queued is never published."""
    k = key()
    options = {"soft_time_limit": 0.5} if how == "soft_limit" else {}
    result = worker.send(tasks.discarded, k, how, **options)
    if how == "ignore":  # no result is stored; Celery logs it as ignored once the run ended
        worker.wait_for_log(f"[{result.id}] ignored")
    else:
        with contextlib.suppress(Exception):
            result.get(timeout=WAIT)
    assert labels(hold_queue, k) == expected
    assert pg_query(worker.database_url, "select 1 from notes where key = %s", k) == (
        [(1,)] if how == "retry" else []
    )


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_other_pools(database_url: str, hold_queue: str, pool: str) -> None:
    """1, 3 and 5 where the body publishes in the loop's own thread (prefork: the loop runs
    inline) or hands the publish to a greenlet (gevent); there, revoke(terminate=True)
    cancels the body at its await, and nothing it queued is published."""
    with service_worker(
        database_url,
        pool=pool,
        concurrency=2 if pool == "prefork" else 4,
        module="tests.apps.oncommit_app",
        env={"AST_HOLD_QUEUE": hold_queue},
    ) as pool_worker:
        ids, messages = in_order(pool_worker, hold_queue, database_url)
        assert [task_id for _, task_id in messages] == ids
        auto = key()
        pool_worker.send(tasks.autocommitted, auto).get(timeout=WAIT)
        assert labels(hold_queue, auto) == ["auto"]
        if pool == "gevent":
            revoked = key()
            result = pool_worker.send(tasks.discarded, revoked, "revoke")
            wait_for_state(result, "QUEUED")
            result.revoke(terminate=True)
            wait_for_state(result, "REVOKED")
            pool_worker.send(tasks.find_note, revoked).get(timeout=WAIT)  # it has ended
            assert labels(hold_queue, revoked) == []


def test_savepoints(worker: ServiceWorker, hold_queue: str, database_url: str) -> None:
    """4: a released SAVEPOINT publishes nothing yet; a rolled-back one drops its calls only."""
    k = key()
    with holding(database_url, k):
        result = worker.send(tasks.savepoints, k)
        wait_for_state(result, "RELEASED")
        assert held(hold_queue, k) == []
    result.get(timeout=WAIT)
    assert labels(hold_queue, k) == ["outer-1", "released", "inner-released", "outer-2"]


def test_autocommit_publishes(worker: ServiceWorker, hold_queue: str) -> None:
    """5 and 6: the library's commit publishes, before the result is stored; a failed body
    does not commit, so it publishes nothing."""
    k = key()
    worker.send(tasks.autocommitted, k).get(timeout=WAIT)
    assert labels(hold_queue, k) == ["auto"]
    failed = key()
    with pytest.raises(ValueError, match=failed):
        worker.send(tasks.autocommitted, failed, True).get(timeout=WAIT)
    assert labels(hold_queue, failed) == []


def test_a_slow_publish_does_not_block_the_loop_in_a_body(
    worker: ServiceWorker, hold_queue: str
) -> None:
    """6: the worker's thread publishes; the loop goes on meanwhile."""
    k = key()
    ticks = worker.send(tasks.slow_publish, k).get(timeout=WAIT)
    assert labels(hold_queue, k) == ["slow"]
    assert ticks >= 10, ticks  # 50 if the loop never waited; 0 if it waited for the publish


def test_a_slow_publish_does_not_block_the_loop_in_a_web_app(
    database_url: str, hold_queue: str
) -> None:
    """6: outside a run the publisher thread publishes; ``await session.commit()`` returns
    once the message is with the broker, and the loop went on meanwhile."""
    k = key()

    async def request(session: AsyncSession) -> tuple[int, list[str]]:
        session.add(Note(key=k, text="web"))
        on_commit(tasks.hold(k, "slow", tasks.SLOW).set(queue=hold_queue), session=session)
        return await tasks.ticks_during(session.commit), labels(hold_queue, k)

    ticks, published = web(database_url, request)
    assert published == ["slow"]
    assert ticks >= 10, ticks


def web(database_url: str, handler: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    """``handler(session)`` on a loop and engine of this process, as a web app runs it."""

    async def main() -> Any:
        engine = create_async_engine(database_url)
        try:
            async with async_sessionmaker(engine, expire_on_commit=False)() as session:
                return await handler(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_broker_down_is_logged_and_counted_in_a_web_app(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """7: the commit stands; the publish fails after the retry policy, and is logged at
    ERROR with the task name and id, and counted; nothing is raised to the caller."""
    k = key()
    before = publish_failures()

    async def request(session: AsyncSession) -> str:
        session.add(Note(key=k, text="web"))
        result = on_commit(tasks.dead_app.signature(tasks.DEAD, args=(k,)), session=session)
        await session.commit()
        return str(result.id)

    with caplog.at_level(logging.ERROR, logger="async_session_task"):
        task_id = web(database_url, request)
    assert publish_failures() == before + 1
    assert pg_query(database_url, "select text from notes where key = %s", k) == [("web",)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert tasks.DEAD in errors[0].getMessage()
    assert task_id in errors[0].getMessage()


def test_broker_down_in_a_body(worker: ServiceWorker) -> None:
    """7: the same in a worker, where the run still succeeds."""
    k = key()
    report = worker.send(tasks.to_dead_broker, k).get(timeout=WAIT)
    assert report["after"] == report["before"] + 1
    assert pg_query(worker.database_url, "select text from notes where key = %s", k) == [
        ("committed",)
    ]
    line = next(line for line in worker.worker.log.splitlines() if report["id"] in line)
    assert "ERROR" in line
    assert tasks.DEAD in line
    # One process (threads pool): the inspect command reports its count.
    assert runtime_stats(worker.worker.app, worker)["publish_failures"] == report["after"]


def test_outside_a_run_a_session_is_required() -> None:
    with pytest.raises(RuntimeError, match="session=session"):
        on_commit(tasks.hold("k", "no session"))
    with pytest.raises(RuntimeError, match="on_commit"):
        tasks.held.delay_on_commit("k", "no session")


#: Requests per race; the handler commits this long after queueing its message.
REQUESTS = 100
COMMIT_DELAY = 0.3


async def place_notes(
    database_url: str, app: Celery, queue: str, *, after_commit: bool
) -> list[AsyncResult]:
    """REQUESTS web requests, 20 at a time: each inserts a note, queues a task that looks
    for it, and commits COMMIT_DELAY seconds later."""
    engine = create_async_engine(database_url, pool_size=20)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    slots = asyncio.Semaphore(20)

    async def request() -> AsyncResult:
        k = key()
        async with slots, maker() as session:
            session.add(Note(key=k, text="race"))
            await session.flush()
            signature = app.signature(tasks.find_note.name, args=(k,), queue=queue)
            result = on_commit(signature, session=session) if after_commit else signature.delay()
            await asyncio.sleep(COMMIT_DELAY)
            await session.commit()
            return result

    try:
        return await asyncio.gather(*(request() for _ in range(REQUESTS)))
    finally:
        await engine.dispose()


# gevent on RabbitMQ runs these tasks about ten a second here, most of them after the
# commit whatever the caller does: the race shows on Redis.
@pytest.mark.parametrize(
    ("pool", "concurrency", "broker"),
    [("prefork", 2, "amqp"), ("threads", 8, "amqp"), ("gevent", 20, "redis")],
)
def test_race(database_url: str, pool: str, concurrency: int, broker: str) -> None:
    """8: with on_commit the worker finds the row every time; with a plain delay() it runs
    before the commit, and misses it."""
    with service_worker(
        database_url,
        pool=pool,
        concurrency=concurrency,
        module="tests.apps.oncommit_app",
        broker=broker,
    ) as race_worker:
        app = client_app(BROKERS[broker])
        found = {}
        for after_commit in (True, False):
            results = asyncio.run(
                place_notes(database_url, app, race_worker.queue, after_commit=after_commit)
            )
            found[after_commit] = sum(bool(r.get(timeout=WAIT)) for r in results)
    print(f"race {pool}/{broker}: on_commit {found[True]}/{REQUESTS}, delay() {found[False]}")
    assert found[True] == REQUESTS
    assert found[False] < REQUESTS


@pytest.fixture
def eager_app(database_url: str, hold_queue: str) -> Iterator[Celery]:
    """Tasks of an app of this process, run with apply() in a rollback scope."""
    app = Celery("oncommit-eager", broker=BROKERS["redis"], set_as_current=False)
    app.conf.update(async_session_url=database_url, task_default_queue=hold_queue)
    yield app
    app.close()


def test_rolled_back_sessions_hold_what_they_queue(eager_app: Celery, hold_queue: str) -> None:
    """9: in rollback_sessions nothing is published; scope.on_commit holds what the commits
    queued (not what a rollback discarded), and release() runs it in the scope."""

    @eager_app.task(bind=True, base=AsyncSessionTask, shared=False)
    async def place(self: AsyncSessionTask, k: str, commit: bool) -> None:
        self.session.add(Note(key=k, text="placed"))
        look.delay_on_commit(k)
        if commit:
            await self.session.commit()

    @eager_app.task(base=AsyncSessionTask, shared=False)
    async def look(k: str) -> bool:
        return await count_notes(k) == 1

    k = key()
    with rollback_sessions(eager_app, [place, look]) as scope:
        place.apply(args=(k, False)).get()
        assert scope.on_commit.signatures == []
        place.apply(args=(k, True)).get()
        assert scope.on_commit.names == [look.name]
        assert [list(s.args) for s in scope.on_commit.signatures] == [[k]]
        assert labels(hold_queue, k) == []
        released = scope.on_commit.release()
        assert [r.get() for r in released] == [True]
        assert scope.on_commit.signatures == []
    assert pg_query(eager_app.conf.async_session_url, "select 1 from notes where key = %s", k) == []
