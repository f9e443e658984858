"""Durable publish under the faults it exists for: a broker down while commits queue
messages, a web process that dies right after COMMIT, relays racing each other and the fast
path; real workers, a private Redis stopped and started, RabbitMQ, a real PgBouncer.

Each test fails without the outbox: a message of a committed transaction is then lost (the
first two), or a relay publishes what another already did (the third).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from async_session_task import _outbox, on_commit
from tests.faults import app
from tests.faults.services import PrivatePgBouncer, PrivatePostgres, PrivateRedis, pgbouncer_missing
from tests.helpers import (
    ROOT,
    FaultWorker,
    StartFaultWorker,
    run_python,
    service_worker,
    unavailable,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]


def queue_of(name: str) -> str:
    return f"q-{name}"  # the queue of worker_process(name=name)


async def commits(
    url: str, key: str, queue: str, committed: int, rolled_back: int, sender: Any = app.app
) -> list[str]:
    """Web-style requests, 50 at a time: each queues one durable message (sent through
    ``sender``'s broker) in a transaction; ``rolled_back`` of them roll back. The task ids
    of the committed ones."""
    engine = create_async_engine(url, pool_size=10)
    done: list[str] = []

    async def request(commit: bool) -> None:
        async with AsyncSession(engine) as session:
            signature = sender.signature(app.record.name, args=(key,), queue=queue)
            result = on_commit(signature, session=session, durable=True)
            if commit:
                await session.commit()
                done.append(result.id)
            else:
                await session.rollback()

    plan = [True] * committed + [False] * rolled_back
    try:
        for start in range(0, len(plan), 50):
            await asyncio.gather(*(request(commit) for commit in plan[start : start + 50]))
    finally:
        await engine.dispose()
    return done


def relay_env(url: str, broker: str, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AST_DATABASE_URL": url,
        "AST_BROKER_URL": broker,
        "AST_RESULT_BACKEND": "cache+memory://",  # the relay reads no results
        "AST_ENGINE_OPTIONS": json.dumps({"connect_args": {"timeout": 10}}),
        **more,
    }


def relay_once(url: str, broker: str, *args: str, **env: str) -> str:
    """``python -m async_session_task relay -A tests.faults.app --once``: its output."""
    done = run_python(
        "-m", "async_session_task", "relay", "-A", "tests.faults.app", "--once", *args,
        env=relay_env(url, broker, **env),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def runs_by_id(worker: FaultWorker, key: str) -> collections.Counter[str]:
    return collections.Counter(worker.entries(key))


def test_a_broker_outage_loses_no_committed_message(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    start_fault_worker: StartFaultWorker,
) -> None:
    """500 commits and 100 rollbacks while Redis is down: the 500 run once each when it is
    back, the 100 never."""
    key, name = uuid.uuid4().hex, uuid.uuid4().hex[:12]
    private_redis.stop()
    try:
        ids = asyncio.run(commits(private_postgres.url, key, queue_of(name), 500, 100))
        rows = private_postgres.query("select count(*) from async_session_outbox")
        assert rows[0][0] >= 500  # the fast path could publish none of them
    finally:
        private_redis.start()
    with start_fault_worker(pool="threads", concurrency=8, name=name) as worker:
        output = relay_once(private_postgres.url, private_redis.url, "--grace", "0")
        assert "relay: published 500 message(s)" in output, output
        worker.wait_for(lambda: sum(runs_by_id(worker, key).values()) >= 500, "500 runs")
        assert runs_by_id(worker, key) == collections.Counter(ids)  # each once, no other


def test_a_web_process_killed_after_commit_is_covered_by_the_relay(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    start_fault_worker: StartFaultWorker,
) -> None:
    """The process exits (``os._exit``) between COMMIT and publish; the relay, through a real
    PgBouncer in transaction pooling mode, delivers the message."""
    unavailable(pgbouncer_missing(), "fault test")
    key, name = uuid.uuid4().hex, uuid.uuid4().hex[:12]
    script = textwrap.dedent(f"""
        import asyncio, os
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
        from async_session_task import on_commit
        from tests.faults import app

        async def main():
            engine = create_async_engine({private_postgres.url!r})
            async with AsyncSession(engine) as session:
                # Listeners run in order: this one before the library's publish.
                event.listen(session.sync_session, "after_commit", lambda s: os._exit(0))
                result = on_commit(
                    app.record.s({key!r}).set(queue={queue_of(name)!r}),
                    session=session, durable=True,
                )
                print(result.id, flush=True)
                await session.commit()
            print("published", flush=True)

        asyncio.run(main())
    """)
    done = run_python("-c", script, env=relay_env(private_postgres.url, private_redis.url))
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.split()[0]
    assert "published" not in done.stdout  # it died between COMMIT and publish
    assert private_postgres.query("select id from async_session_outbox where id = %s", task_id)
    bouncer = PrivatePgBouncer(private_postgres, pool_size=2)
    try:
        with start_fault_worker(pool="threads", concurrency=2, name=name) as worker:
            output = relay_once(bouncer.url, private_redis.url, "--grace", "0", AST_PGBOUNCER="1")
            assert "relay: published" in output, output
            worker.wait_for(lambda: worker.entries(key) == [task_id], "the relayed run")
    finally:
        bouncer.destroy()


@contextlib.contextmanager
def relays(
    url: str, broker: str, count: int, grace: float
) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` relay processes, running until the block ends (SIGTERM)."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "async_session_task",
                "relay",
                "-A",
                "tests.faults.app",
                "--grace",
                str(grace),
                "--poll",
                "0.2",
            ],
            cwd=ROOT,
            env=relay_env(url, broker),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            output, _ = process.communicate(timeout=60)
            assert process.returncode == 0, output


def test_two_relays_and_the_fast_path_run_each_message_once(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis
) -> None:
    """RabbitMQ: 700 messages published by the fast path while two relays run, and 300 left
    to the relays (the fast path paused): 1,000 task ids, each run once."""
    key, name = uuid.uuid4().hex, uuid.uuid4().hex[:12]
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    sender = Celery("outbox-sender", broker=amqp, set_as_current=False)
    try:
        with service_worker(
            private_postgres.url, app=app.app, module="tests.faults.app", broker="amqp",
            pool="threads", concurrency=8, name=name, connect_args={"timeout": 10},
            env={"AST_RESULT_BACKEND": private_redis.url},
        ) as worker, relays(private_postgres.url, amqp, 2, grace=2.0):  # fmt: skip
            url, queue = private_postgres.url, queue_of(name)
            fast = asyncio.run(commits(url, key, queue, 700, 0, sender))
            _outbox._paused_until = float("inf")  # the fast path leaves these to the relays
            try:
                left = asyncio.run(commits(url, key, queue, 300, 0, sender))
            finally:
                _outbox._paused_until = 0.0
            expected = collections.Counter(fast + left)
            fault = FaultWorker(worker.worker, worker.application_name, private_postgres)
            fault.wait_for(
                lambda: sum(runs_by_id(fault, key).values()) >= 1000, "1,000 runs", timeout=120
            )
            assert runs_by_id(fault, key) == expected
    finally:
        sender.close()
