"""Durable publish: the outbox row written in the caller's transaction, the fast path, and the
relay, in-process on PostgreSQL (a real database; the broker is kombu's in-memory transport,
or a port nothing listens on)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain
from celery.signals import after_task_publish
from kombu.exceptions import EncodeError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from async_session_task import AsyncSessionTask, _outbox, on_commit
from async_session_task._relay import Options, Relay
from tests.apps.models import Note
from tests.helpers import pg_query

pytestmark = pytest.mark.services

LIVE = Celery("outbox-live", broker="memory://", set_as_current=False)
DOWN = Celery("outbox-down", broker="redis://127.0.0.1:1/0", set_as_current=False)
DOWN.conf.broker_connection_timeout = 1


@LIVE.task(name="outbox.record")
def record(key: str, n: int) -> None: ...


def down(key: str, n: int = 0, **options: Any) -> Any:
    return DOWN.signature("outbox.record", args=(key, n), **options)


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Task ids published (handed to the broker) in this process while the test runs."""
    ids: list[str] = []
    _outbox._paused_until = 0.0  # a refused publish of an earlier test paused the fast path

    def seen(headers: Any = None, **_: Any) -> None:
        ids.append(headers["id"])

    after_task_publish.connect(seen, weak=False)
    yield ids
    after_task_publish.disconnect(seen)


def rows(database_url: str, key: str) -> list[tuple[Any, ...]]:
    """Outbox rows (id, attempts, dead) of messages whose arguments hold ``key``."""
    return pg_query(
        database_url,
        "select id, attempts, dead_at is not null from async_session_outbox"
        " where position(%s in convert_from(body, 'utf8')) > 0 order by created_at",
        key,
    )


@pytest.fixture
def engine(database_url: str) -> AsyncEngine:
    return create_async_engine(database_url)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def commit_with(engine: AsyncEngine, *signatures: Any, nested: Any = None) -> list[str]:
    try:
        async with AsyncSession(engine) as session:
            ids = [on_commit(s, session=session, durable=True).id for s in signatures]
            if nested is not None:
                savepoint = await session.begin_nested()
                ids.append(on_commit(nested, session=session, durable=True).id)
                await savepoint.rollback()
            await session.commit()
            return ids
    finally:
        await engine.dispose()


def test_the_fast_path_publishes_then_deletes_the_row(
    engine: AsyncEngine, database_url: str, published: list[str]
) -> None:
    key = uuid.uuid4().hex
    ids = run(commit_with(engine, record.s(key, 1), record.s(key, 2)))
    assert published[-2:] == ids
    assert rows(database_url, key) == []


def test_a_refused_publish_leaves_the_row_for_the_relay(
    engine: AsyncEngine, database_url: str, published: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    key = uuid.uuid4().hex
    with caplog.at_level(logging.WARNING, "async_session_task"):
        ids = run(commit_with(engine, down(key, countdown=30)))
    assert "stay in the outbox for the relay" in caplog.text
    assert [row[0] for row in rows(database_url, key)] == ids

    async def relay() -> Any:
        relay = Relay(LIVE, create_async_engine(database_url), Options(grace=0))
        try:
            return await relay.run_once()
        finally:
            relay.close()
            await relay.engine.dispose()

    outcome = run(relay())
    assert outcome.published >= 1
    assert ids[0] in published
    assert rows(database_url, key) == []


def test_a_rolled_back_savepoint_drops_only_its_row(engine: AsyncEngine, database_url: str) -> None:
    key = uuid.uuid4().hex
    ids = run(commit_with(engine, down(key, 1), nested=down(key, 2)))
    assert [row[0] for row in rows(database_url, key)] == ids[:1]


def test_a_failed_commit_leaves_no_row(engine: AsyncEngine, database_url: str) -> None:
    key = uuid.uuid4().hex

    async def failing() -> None:
        try:
            async with AsyncSession(engine) as session:
                on_commit(down(key), session=session, durable=True)
                session.add_all([Note(id=-7, key=key, text="a"), Note(id=-7, key=key, text="b")])
                await session.commit()
        finally:
            await engine.dispose()

    with pytest.raises(IntegrityError):
        run(failing())
    assert rows(database_url, key) == []


def test_an_argument_that_cannot_be_serialized_fails_at_the_call(engine: AsyncEngine) -> None:
    async def call() -> None:
        try:
            async with AsyncSession(engine) as session:
                on_commit(record.s(object(), 1), session=session, durable=True)
        finally:
            await engine.dispose()

    with pytest.raises(EncodeError):
        run(call())


def test_a_countdown_is_stored_as_an_absolute_eta(engine: AsyncEngine, database_url: str) -> None:
    from async_session_task._outbox import restore

    key = uuid.uuid4().hex
    run(commit_with(engine, down(key, countdown=3600)))
    (row,) = pg_query(
        database_url,
        "select content_type, content_encoding, body from async_session_outbox"
        " where position(%s in convert_from(body, 'utf8')) > 0",
        key,
    )

    class Row:
        content_type, content_encoding, body = row

    signature, _ = restore(LIVE, Row)
    eta = signature.options["eta"]
    assert "countdown" not in signature.options
    assert datetime.timedelta(minutes=59) < eta - datetime.datetime.now(datetime.UTC)


async def drain(database_url: str, relays: int, **options: Any) -> list[Any]:
    """Run ``relays`` relays side by side until none finds a due row; their outcomes."""
    made = [
        Relay(LIVE, create_async_engine(database_url), Options(grace=0, **options))
        for _ in range(relays)
    ]

    async def until_empty(relay: Relay) -> list[Any]:
        outcomes = []
        while (outcome := await relay.run_once()).claimed:
            outcomes.append(outcome)
        return outcomes

    try:
        results = await asyncio.gather(*(until_empty(relay) for relay in made))
        return [outcome for outcomes in results for outcome in outcomes]
    finally:
        for relay in made:
            relay.close()
            await relay.engine.dispose()


def test_two_relays_share_the_rows_without_overlap(
    engine: AsyncEngine, database_url: str, published: list[str]
) -> None:
    key = uuid.uuid4().hex
    ids = run(commit_with(engine, *(down(key, n) for n in range(300))))
    outcomes = run(drain(database_url, 2, batch=20))
    assert sorted(i for i in published if i in set(ids)) == sorted(ids)  # each once
    assert sum(outcome.published for outcome in outcomes) >= 300
    assert rows(database_url, key) == []


def test_a_relayed_chain_keeps_its_ids(
    engine: AsyncEngine, database_url: str, published: list[str]
) -> None:
    key = uuid.uuid4().hex
    signature = chain(down(key, 1), down(key, 2))
    (last,) = run(commit_with(engine, signature))
    run(drain(database_url, 1))
    first = signature.tasks[0].options["task_id"]
    assert first in published  # the chain's first message, under its frozen id
    assert last == signature.tasks[1].options["task_id"]


def test_a_row_that_keeps_failing_becomes_a_dead_letter(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = uuid.uuid4().hex
    pg_query(
        database_url,
        "insert into async_session_outbox (id, task_name, content_type, content_encoding, body)"
        " values (%s, 'outbox.record', 'application/json', 'utf-8', %s) returning id",
        key,
        f"not json {key}".encode(),
    )
    with caplog.at_level(logging.WARNING, "async_session_task"):
        for _ in range(3):
            run(drain(database_url, 1, dead_after=2, backoff_cap=0.0))
    assert rows(database_url, key) == [(key, 2, True)]
    assert caplog.text.count("is a dead letter now") == 1


def test_delay_on_commit_durable_in_a_body(database_url: str, published: list[str]) -> None:
    """In a task body, ``delay_on_commit(..., durable=True)``: published after the run's
    commit, its row deleted."""

    app = Celery("outbox-body", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.async_session_url = database_url
    key = uuid.uuid4().hex

    @app.task(base=AsyncSessionTask, shared=False)
    async def noted(key: str) -> None: ...

    @app.task(bind=True, base=AsyncSessionTask, autocommit=True, shared=False)
    async def body(self: AsyncSessionTask) -> str:
        return str(noted.delay_on_commit(key, durable=True).id)

    task_id = body.apply().get()
    assert task_id in published
    assert rows(database_url, key) == []
