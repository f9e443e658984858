"""Bad input: one clear error each, at the first run at the latest, and nothing half done.

In-process (eager ``apply()`` on SQLite) for every case, and on a real worker for the ones a
worker meets at start and in a result.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from async_session_task import AsyncSessionTask, current_session
from async_session_task._config import Settings
from async_session_task._registry import runs
from async_session_task._worker import check_worker_tasks
from tests.apps import misconfigured_app
from tests.helpers import StartWorker

SQLITE = "sqlite+aiosqlite://"
#: Not a sessionmaker of any kind: what a wrong import string may resolve to.
NOT_A_MAKER = {"not": "a maker"}
#: A sync sessionmaker: the most likely wrong object.
SYNC_MAKER = sessionmaker()

MakeTask = Callable[..., Any]


@pytest.fixture
def app() -> Celery:
    return Celery(f"bad-{uuid.uuid4().hex[:8]}", set_as_current=False)


@pytest.fixture
def make_task(app: Celery) -> MakeTask:
    """A new task (so a new class, resolved afresh) with the given settings as options."""

    def make(**options: Any) -> Any:
        @app.task(
            bind=True,
            base=AsyncSessionTask,
            name=f"t{uuid.uuid4().hex[:8]}",
            shared=False,
            **options,
        )
        async def task(self: AsyncSessionTask) -> int:
            return int(await self.session.scalar(text("select 1")) or 0)

        return task

    return make


def fails_with(task: Any, error: type[BaseException], match: str) -> BaseException:
    """Run ``task`` eagerly: it fails with ``error`` matching ``match``, leaving no session."""
    before = len(runs)
    result = task.apply()
    assert result.state == "FAILURE"
    with pytest.raises(error, match=match) as raised:
        result.get()
    assert len(runs) == before
    return raised.value


def test_a_valid_task_runs(make_task: MakeTask) -> None:
    """The baseline the failures below differ from in one setting each."""
    assert make_task(async_session_url=SQLITE).apply().get() == 1


def test_missing_setting(make_task: MakeTask) -> None:
    fails_with(
        make_task(),
        ImproperlyConfigured,
        r"has no database: set app.conf.async_session_url .* or app.conf.async_session_maker",
    )


def test_both_url_and_maker(make_task: MakeTask) -> None:
    fails_with(
        make_task(
            async_session_url=SQLITE, async_session_maker="tests.apps.maker_app:SessionLocal"
        ),
        ImproperlyConfigured,
        "has both async_session_url and async_session_maker set: keep one",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u@h/db", r"names no driver; use 'postgresql\+asyncpg://'"),
        (
            "postgresql+psycopg2://u@h/db",
            r"uses 'psycopg2', a sync driver; use 'postgresql\+asyncpg",
        ),
        ("sqlite:///x.db", r"names no driver; use 'sqlite\+aiosqlite://'"),
        ("sqlite+pysqlite:///x.db", r"uses 'pysqlite', a sync driver; use 'sqlite\+aiosqlite://'"),
        ("mysql+mysqldb://u@h/db", r"a sync driver; use 'mysql\+aiomysql://'"),
    ],
)
def test_sync_driver_names_the_async_one(make_task: MakeTask, url: str, message: str) -> None:
    fails_with(make_task(async_session_url=url), ImproperlyConfigured, message)


def test_unknown_driver(make_task: MakeTask) -> None:
    fails_with(
        make_task(async_session_url="postgresql+nodriver://u@h/db"),
        ImproperlyConfigured,
        r"SQLAlchemy has no driver 'postgresql\+nodriver' .*; use 'postgresql\+asyncpg://'",
    )


@pytest.mark.parametrize(
    "url", ["not a url", "", "postgresql+asyncpg://user:pw@host:notaport/db", "://"]
)
def test_malformed_url(make_task: MakeTask, url: str) -> None:
    fails_with(
        make_task(async_session_url=url),
        ImproperlyConfigured,
        r"async_session_url is not a database URL; expected e.g. 'postgresql\+asyncpg://",
    )


def test_url_of_the_wrong_type(make_task: MakeTask) -> None:
    fails_with(
        make_task(async_session_url=5432),
        ImproperlyConfigured,
        "async_session_url must be a string such as .*, got int",
    )


ENGINE = "async_session_engine_options"
SESSION = "async_session_options"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (ENGINE, ["pool_size", 5], f"{ENGINE} must be a dict of keyword arguments, got list"),
        (ENGINE, {"pool_sizee": 5}, r"\['pool_sizee'\] are not valid for sqlite\+aiosqlite://"),
        (ENGINE, {"pool_sizee": 5}, r"Invalid argument\(s\) 'pool_sizee' sent to create_engine"),
        (ENGINE, {"echo": True, "pool_size": "5"}, r"\['echo', 'pool_size'\] are not valid"),
        (SESSION, "expire_on_commit=False", f"{SESSION} must be a dict of keyword arguments"),
        (SESSION, {"expire_on_comit": False}, "has 'expire_on_comit', not a keyword of async_s"),
        (SESSION, {"bind": None}, "has 'bind', .* for your own binds set async_session_maker"),
    ],
)
def test_options_of_the_wrong_type_or_keyword(
    make_task: MakeTask, name: str, value: Any, message: str
) -> None:
    fails_with(make_task(async_session_url=SQLITE, **{name: value}), ImproperlyConfigured, message)


def test_known_session_options_pass(make_task: MakeTask) -> None:
    options = {"autoflush": False, "info": {"a": 1}, "join_transaction_mode": "rollback_only"}
    assert make_task(async_session_url=SQLITE, async_session_options=options).apply().get() == 1


def test_options_with_a_maker(make_task: MakeTask) -> None:
    fails_with(
        make_task(
            async_session_maker="tests.apps.maker_app:SessionLocal",
            async_session_engine_options={"pool_size": 1},
        ),
        ImproperlyConfigured,
        "apply only to async_session_url; configure your async_sessionmaker instead",
    )


@pytest.mark.parametrize(
    ("maker", "message"),
    [
        ("tests.no_such_module:SessionLocal", r"does not resolve \(ModuleNotFoundError: "),
        ("tests.test_bad_input:NoSuchName", r"does not resolve \(AttributeError: "),
        ("tests.test_bad_input:NOT_A_MAKER", "must be a .*async_sessionmaker, got dict"),
        ("tests.test_bad_input:SYNC_MAKER", r"got sessionmaker \(a sync sessionmaker: use sqlalch"),
        (SYNC_MAKER, r"got sessionmaker \(a sync sessionmaker: use sqlalchemy"),
    ],
)
def test_maker_that_does_not_resolve_or_is_not_an_async_sessionmaker(
    make_task: MakeTask, maker: Any, message: str
) -> None:
    fails_with(make_task(async_session_maker=maker), ImproperlyConfigured, message)


def test_session_outside_a_run(make_task: MakeTask) -> None:
    task = make_task(async_session_url=SQLITE)
    with pytest.raises(RuntimeError, match=r"\.session exists only during a run of the task"):
        task.session  # noqa: B018
    with pytest.raises(RuntimeError, match=r"current_session\(\) was called outside a task run"):
        current_session()


def test_current_session_in_a_coroutine_that_is_not_a_run() -> None:
    with pytest.raises(RuntimeError, match=r"current_session\(\) was called outside a task run"):
        asyncio.run(_current_session())


async def _current_session() -> Any:
    return current_session()


def test_sync_body_is_refused_at_class_creation(app: Celery) -> None:
    with pytest.raises(TypeError, match="an AsyncSessionTask body must be 'async def'"):

        class Sync(AsyncSessionTask):
            def run(self) -> None:  # the mistake under test
                pass

    @app.task(base=AsyncSessionTask, shared=False)
    def sync_task() -> None:
        pass

    # @app.task makes the class when the task is first used.
    with pytest.raises(TypeError, match="an AsyncSessionTask body must be 'async def'"):
        sync_task.name  # noqa: B018


async def _answer() -> int:
    return 42


def test_body_that_returns_an_unawaited_coroutine(app: Celery) -> None:
    @app.task(base=AsyncSessionTask, async_session_url=SQLITE, shared=False)
    async def forgot_await() -> Any:
        return _answer()  # the mistake under test: 'return await _answer()'

    result = forgot_await.apply()
    assert result.state == "FAILURE"
    with pytest.raises(TypeError, match=r"returned .*coroutine.* await it: 'return await"):
        result.get()


def test_settings_are_checked_at_worker_start(
    make_task: MakeTask, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_task(async_session_url=SQLITE)
    bad = make_task(async_session_url="postgresql+psycopg2://u@h/db")
    missing = make_task()
    with caplog.at_level(logging.ERROR, logger="async_session_task"):
        check_worker_tasks(app)
    # Only this test's tasks: shared tasks of other test apps are in every app's registry.
    ours = (good.name, bad.name, missing.name)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().split()[1] in ours]
    assert len(messages) == 2, messages
    assert any(bad.name in m and "postgresql+asyncpg" in m for m in messages)
    assert any(missing.name in m and "has no database" in m for m in messages)
    assert not any(good.name in m for m in messages)


def test_settings_repr_hides_the_password() -> None:
    settings = Settings("postgresql+asyncpg://u:hunter2@h/db", {}, {}, None, "t")
    assert "hunter2" not in repr(settings)
    assert "u:***@h" in repr(settings)


# -- on a real worker -------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.timeout(180)
def test_real_worker_reports_bad_settings_at_start_and_in_results(
    start_worker: StartWorker,
) -> None:
    with start_worker(
        pool="prefork",
        concurrency=1,
        module="tests.apps.misconfigured_app",
        app=misconfigured_app.app,
    ) as worker:
        outcomes = {
            name: worker.send(task).get(timeout=60, propagate=False)
            for name, task in misconfigured_app.broken_tasks().items()
        }
        # The worker still serves a valid task after all those failures.
        assert worker.send(misconfigured_app.connects).get(timeout=60)["user"] == "root"
        assert worker.worker.stop() == 0
        log = worker.worker.log
    for name, expected in misconfigured_app.EXPECTED.items():
        assert isinstance(outcomes[name], ImproperlyConfigured), (name, outcomes[name])
        assert expected in str(outcomes[name]), (name, outcomes[name])
        task_name = misconfigured_app.broken_tasks()[name].name
        # worker_init logged it before any message arrived.
        assert f"Task {task_name} will fail every run: " in log, log[-3000:]
    assert "still registered at shutdown" not in log
