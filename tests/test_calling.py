"""Calling tasks from async code: ``apublish``/``adelay``/``aapply_async`` and ``aget`` on real
workers and brokers (Redis, RabbitMQ), a broker at a dead port, and the publisher that serves
``on_commit`` in a web app (a commit cancelled after COMMIT, concurrent commits while the
broker is down)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest
import redis
from celery import Celery, group
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from async_session_task import PublishTimeout, ResultTimeout, aget, apublish, on_commit
from async_session_task._on_commit import publish_failures
from tests.apps import oncommit_app as tasks
from tests.apps import pg_app
from tests.helpers import BROKERS, StartWorker
from tests.test_on_commit import held

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


async def with_ticker(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    """Await ``awaitable`` while a ticker runs on the same loop: its result (or exception)
    and the longest the loop went without ticking (seconds)."""
    longest, last, running = 0.0, time.monotonic(), True

    async def tick() -> None:
        nonlocal longest, last
        while running:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    ticker = asyncio.create_task(tick())
    try:
        try:
            return await awaitable, longest
        except Exception as exc:
            return exc, longest
    finally:
        running = False
        await ticker


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_adelay_and_aget_round_trip(start_worker: StartWorker, broker: str) -> None:
    with start_worker(pool="threads", concurrency=4, broker=broker) as worker:
        queue = worker.queue

        # The task's own app sends through Redis; the worker's client app through its broker.
        sender = worker.worker.app
        signature = sender.signature(pg_app.probe.name, args=(0.0,), queue=queue)

        async def main() -> list[Any]:
            if broker == "redis":
                sent = await pg_app.probe.aapply_async((0.0,), queue=queue, publish_timeout=5)
            else:
                sent = await apublish(signature, publish_timeout=5)
            both = await apublish(group(signature, signature), publish_timeout=5)
            return [await aget(sent, timeout=30), await aget(both, timeout=30)]

        (single, pair), longest = asyncio.run(with_ticker(main()))
        assert single["before"]["id"] == single["after"]["id"]
        assert [len(result["before"]) for result in pair] == [3, 3]
        assert longest < 0.3, longest  # the loop kept ticking while it waited


def test_aget_raises_as_get_does(start_worker: StartWorker) -> None:
    with start_worker(pool="threads", concurrency=2) as worker:
        failing = worker.send(pg_app.outcome, uuid.uuid4().hex, "error")
        revoked = worker.send(pg_app.probe, 5.0, countdown=1)
        revoked.revoke()  # the worker holds it until its ETA, then marks it revoked

        async def main() -> list[Any]:
            found: list[Any] = []
            for result, timeout in ((failing, 30), (revoked, 30)):
                try:
                    await aget(result, timeout=timeout)
                except Exception as exc:
                    found.append(exc)
            found.append(await aget(failing, timeout=30, propagate=False))
            try:
                await aget(pg_app.app.AsyncResult(uuid.uuid4().hex), timeout=0.3)
            except TimeoutError as exc:
                found.append(exc)
            return found

        raised, revoked_exc, quiet, timed_out = asyncio.run(main())
        assert type(raised).__name__ == "ValueError"
        assert (
            "revoked" in str(revoked_exc).lower()
            or type(revoked_exc).__name__ == "TaskRevokedError"
        )
        assert type(quiet).__name__ == "ValueError"  # returned, not raised
        assert isinstance(timed_out, ResultTimeout)


def test_a_dead_broker_times_out_within_the_bound() -> None:
    dead = Celery("dead-calling", broker="redis://127.0.0.1:1/0", set_as_current=False)
    dead.conf.broker_connection_timeout = 1

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(PublishTimeout):
            await apublish(dead.signature("dead.task"), publish_timeout=1.0)
        return time.monotonic() - started

    elapsed, longest = asyncio.run(with_ticker(main()))
    assert elapsed < 1.5, elapsed
    assert longest < 0.3, longest


def test_a_commit_cancelled_after_commit_still_publishes(database_url: str) -> None:
    """The publish is slow (0.5 s); the request is cancelled while it waits: the message is
    published all the same."""
    key = uuid.uuid4().hex
    queue = tasks.HOLD_QUEUE

    async def request() -> None:
        engine = create_async_engine(database_url)
        try:
            async with AsyncSession(engine) as session:
                on_commit(tasks.hold(key, "slow", name=tasks.SLOW), session=session)
                commit = asyncio.create_task(session.commit())
                await asyncio.sleep(0.2)  # COMMIT done, the publish in progress
                commit.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await commit
            await asyncio.sleep(1.0)  # the publisher thread finishes meanwhile
        finally:
            await engine.dispose()

    asyncio.run(request())
    assert [label for label, _ in held(queue, key)] == ["slow"]


def test_concurrent_commits_with_the_broker_down_end_within_their_own_bound(
    database_url: str,
) -> None:
    tasks.dead_app.conf.async_session_publish_timeout = 1.0
    before = publish_failures()

    async def one(engine: Any) -> float:
        started = time.monotonic()
        async with AsyncSession(engine) as session:
            on_commit(tasks.dead_app.signature(tasks.DEAD, args=("k",)), session=session)
            await session.commit()
        return time.monotonic() - started

    async def main() -> list[float]:
        engine = create_async_engine(database_url, pool_size=10)
        try:
            return await asyncio.gather(*(one(engine) for _ in range(8)))
        finally:
            await engine.dispose()

    try:
        durations = asyncio.run(main())
    finally:
        tasks.dead_app.conf.async_session_publish_timeout = None
    assert max(durations) < 1.6, durations  # each its own 1 s bound, not 8 queued failures
    time.sleep(3)  # the started publishes end, the queued ones are dropped: all counted
    assert publish_failures() - before == 8


def test_cancelled_waiters_stop_polling() -> None:
    """50 waiters for results that never come, cancelled: nothing keeps asking the backend."""
    backend = pg_app.app.backend
    calls: list[float] = []
    original = backend.get_task_meta

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return original(*args, **kwargs)

    async def main() -> None:
        waiters = [
            asyncio.create_task(aget(pg_app.app.AsyncResult(uuid.uuid4().hex))) for _ in range(50)
        ]
        await asyncio.sleep(0.8)  # each has looked itself once (at 0.5 s), next at 1.5 s
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        cancelled_at = time.monotonic()
        await asyncio.sleep(1.5)  # past the next look of every waiter
        assert calls, "the waiters never asked"
        assert max(calls) < cancelled_at + 0.1, "a cancelled waiter kept polling"

    backend.get_task_meta = counted
    try:
        asyncio.run(main())
    finally:
        del backend.get_task_meta


def test_waiters_share_one_redis_subscriber(start_worker: StartWorker) -> None:
    """200 waiters in one process: one pub/sub connection holds their 200 channels; each is
    woken by its result's message, then unsubscribed."""
    client = redis.Redis.from_url(BROKERS["redis"])

    def subscribed() -> list[int]:
        return [int(c["sub"]) for c in client.client_list() if int(c.get("sub", 0)) >= 200]

    with start_worker(pool="threads", concurrency=4) as worker:
        pending = [pg_app.app.AsyncResult(uuid.uuid4().hex) for _ in range(199)]

        async def main() -> tuple[list[int], Any]:
            waiters = [asyncio.create_task(aget(result, timeout=60)) for result in pending]
            sent = worker.send(pg_app.probe, 0.5)
            # Woken by its result's message: its next look of its own would be in 100 s.
            answer = asyncio.create_task(aget(sent, timeout=30, interval=100))
            await asyncio.sleep(0.3)  # every waiter has subscribed
            during = await asyncio.to_thread(subscribed)
            value = await answer
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            return during, value

        during, value = asyncio.run(main())
    assert during == [200], during  # one connection, 200 channels
    assert value["before"]["id"] == value["after"]["id"]
    time.sleep(0.3)
    assert subscribed() == []  # every channel unsubscribed
    client.close()


def test_sending_leaves_no_subscription(start_worker: StartWorker) -> None:
    """Celery's Redis backend subscribes to a task's result channel as it sends the task, for
    a get() in the same thread; nothing in a publisher thread reads it, so it must not stay."""
    client = redis.Redis.from_url(BROKERS["redis"])
    with start_worker(pool="threads", concurrency=4) as worker:

        async def main() -> list[Any]:
            sent = await asyncio.gather(
                *(pg_app.probe.aapply_async((0.0,), queue=worker.queue) for _ in range(100))
            )
            await asyncio.gather(*(aget(result, timeout=60) for result in sent))
            return sent

        sent = asyncio.run(main())
        time.sleep(0.3)  # the subscriber has unsubscribed after its waiters
        channels = [pg_app.app.backend.get_key_for_task(result.id) for result in sent]
        counts = dict(client.pubsub_numsub(*channels))
    client.close()
    assert len(counts) == 100
    assert sum(counts.values()) == 0, [c for c, n in counts.items() if n][:3]


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_sending_from_inside_a_body(start_worker: StartWorker, pool: str) -> None:
    with start_worker(pool=pool, concurrency=2) as worker:
        ids = worker.send(pg_app.sends_async, worker.queue).get(timeout=30).split()
        children = [pg_app.app.AsyncResult(task_id).get(timeout=30) for task_id in ids]
        assert [len(child["before"]) for child in children] == [3, 3]


def test_aget_receives_rpc_replies(start_worker: StartWorker) -> None:
    """``rpc://`` stores nothing: the replies are received by a thread of the sending process.
    200 concurrent sends and waits, a reply that came before its waiter, a result awaited
    twice, a failing task re-raised, an unknown id timing out, a cancelled waiter forgotten."""
    rpc = {"AST_RESULT_BACKEND": "rpc://"}
    with start_worker(pool="threads", concurrency=4, broker="amqp", env=rpc) as worker:
        client = Celery("rpc-client", broker=BROKERS["amqp"], backend="rpc://")
        probe = client.signature(pg_app.probe.name, args=(0.0,), queue=worker.queue)
        failing = client.signature(
            pg_app.outcome.name, args=(uuid.uuid4().hex, "error"), queue=worker.queue
        )

        async def main() -> dict[str, Any]:
            sent = await asyncio.gather(*(apublish(probe, publish_timeout=10) for _ in range(200)))
            values = await asyncio.gather(*(aget(result, timeout=60) for result in sent))
            early = await apublish(probe, publish_timeout=10)
            await asyncio.sleep(1.0)  # its reply is waiting before anyone waits for it
            bad = await apublish(failing, publish_timeout=10)
            found: dict[str, Any] = {
                "values": values,
                "early": await aget(early, timeout=30),
                "again": await aget(early, timeout=5),
                "quiet": await aget(bad, timeout=30, propagate=False),
                "backends": {id(result.backend) for result in sent},
            }
            try:
                await aget(bad, timeout=30)
            except ValueError as exc:
                found["raised"] = exc
            unknown = client.AsyncResult(uuid.uuid4().hex, backend=early.backend)
            try:
                await aget(unknown, timeout=0.3)
            except TimeoutError as exc:
                found["timed_out"] = exc
            gone = client.AsyncResult(uuid.uuid4().hex, backend=early.backend)
            waiting = asyncio.create_task(aget(gone))
            await asyncio.sleep(0.3)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await asyncio.sleep(0.3)  # the thread takes the cancellation between two drains
            concrete, weak = early.backend._pending_results
            found["left"] = [*concrete, *weak]
            return found

        (found, longest) = asyncio.run(with_ticker(main()))
        client.close()
    assert len(found["values"]) == 200
    assert all(value["before"]["id"] == value["after"]["id"] for value in found["values"])
    assert found["early"]["before"]["id"] == found["again"]["before"]["id"]
    assert isinstance(found["quiet"], ValueError)  # returned, not raised
    assert isinstance(found["raised"], ValueError)
    assert isinstance(found["timed_out"], ResultTimeout)
    assert found["left"] == []  # the cancelled waiter left nothing registered
    # One thread per reply queue: the publisher threads' backends, no more.
    threads = [t for t in threading.enumerate() if t.name == "async_session_task-replies"]
    assert 1 <= len(threads) <= len(found["backends"]), (len(threads), found["backends"])
    assert longest < 0.3, longest


def test_several_loops_and_a_forked_child(start_worker: StartWorker) -> None:
    """Four threads, each with its own loop, send and wait at once; then the process forks
    (as gunicorn --preload does) and the child, whose publisher and subscriber threads were
    not inherited, sends and waits on its own."""
    with start_worker(pool="threads", concurrency=4) as worker:

        async def round_trip(n: int) -> list[Any]:
            sent = [await pg_app.probe.aapply_async((0.0,), queue=worker.queue) for _ in range(n)]
            return [await aget(result, timeout=30) for result in sent]

        found: dict[int, list[Any]] = {}

        def in_thread(i: int) -> None:
            found[i] = asyncio.run(round_trip(5))

        threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(found) == [0, 1, 2, 3]
        assert all(len(values) == 5 for values in found.values())

        child = os.fork()
        if child == 0:  # the child: report through its exit status only
            try:
                values = asyncio.run(round_trip(3))
                os._exit(0 if len(values) == 3 and all("before" in v for v in values) else 1)
            except BaseException:
                os._exit(2)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(child, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the forked child never finished"
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert len(asyncio.run(round_trip(2))) == 2  # and the parent still sends and waits


def test_aget_of_a_group_in_order(start_worker: StartWorker) -> None:
    """A group's children are awaited at once; the values come in order, a failure is
    re-raised (or returned in its place with ``propagate=False``), as ResultSet.get() does."""
    with start_worker(pool="threads", concurrency=4) as worker:
        probe = pg_app.probe.s(0.05).set(queue=worker.queue)
        failing = pg_app.outcome.s(uuid.uuid4().hex, "error").set(queue=worker.queue)

        async def main() -> tuple[list[Any], list[Any], BaseException | None]:
            many = await apublish(group([probe] * 40), publish_timeout=10)
            values = await aget(many, timeout=60)
            mixed = await apublish(group(probe, failing, probe), publish_timeout=10)
            quiet = await aget(mixed, timeout=60, propagate=False)
            try:
                await aget(mixed, timeout=60)
            except ValueError as exc:
                return values, quiet, exc
            return values, quiet, None

        values, quiet, raised = asyncio.run(main())
    assert len(values) == 40
    assert all(value["before"]["id"] == value["after"]["id"] for value in values)
    assert [type(value).__name__ for value in quiet] == ["dict", "ValueError", "dict"]
    assert isinstance(raised, ValueError)
