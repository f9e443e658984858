"""``async_session_task.testing`` and its pytest plugin, on SQLite and PostgreSQL.

Rolled-back eager runs are checked against a second, independent connection; the worker
fixture runs a real ``celery worker`` (filesystem broker with SQLite, Redis with PostgreSQL).
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from sqlalchemy import Integer, String, create_engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask
from async_session_task.testing import WorkerProcess, file_broker_settings, rollback_sessions
from tests.apps import models, pg_app, sqlite_app

pytest_plugins = ["pytester"]

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = "helper_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(String(200))


def sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def committed(url: str, key: str) -> list[str]:
    """Texts of ``key`` as another connection sees them: what really reached the database."""
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            query = select(Entry.text).where(Entry.key == key).order_by(Entry.id)
            return list(connection.scalars(query))
    finally:
        engine.dispose()


async def texts(session: AsyncSession, key: str) -> list[str]:
    query = select(Entry.text).where(Entry.key == key).order_by(Entry.id)
    return list(await session.scalars(query))


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'helpers.db'}"
    else:
        url = request.getfixturevalue("database_url")
    engine = create_engine(sync_url(url))
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


def make_app(url: str | None) -> Celery:
    app = Celery("helpers", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.async_session_url = url
    return app


class Tasks:
    """Tasks as users write them, defined on ``app``.

    ``shared=False``: a shared task would be added to every app made later in this process
    (Celery's finalizers), colliding with the same name there. For the same reason the tests
    name their tasks (``rollback_sessions(app, tasks)``) instead of letting ``app.tasks``
    finalize the app and pull in other modules' shared tasks; test_plugin_in_a_users_project
    covers the default selection, in a process of its own.
    """

    def __init__(self, app: Celery) -> None:
        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def write(task: AsyncSessionTask, key: str, text: str, commit: bool = True) -> int:
            task.session.add(Entry(key=key, text=text))
            if commit:
                await task.session.commit()
            else:
                await task.session.flush()
            return len(await texts(task.session, key))

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def duplicate(task: AsyncSessionTask, key: str, entry_id: int) -> None:
            task.session.add(Entry(key=key, text="dropped"))
            await task.session.flush()
            task.session.add(Entry(id=entry_id, key=key, text="duplicate"))
            await task.session.flush()  # IntegrityError

        @app.task(bind=True, base=AsyncSessionTask, shared=False)
        async def outer(task: AsyncSessionTask, key: str) -> list[Any]:
            task.session.add(Entry(key=key, text="outer"))
            await task.session.flush()
            inner = write.apply(args=(key, "inner")).get(disable_sync_subtasks=False)
            await task.session.commit()
            return [inner, await texts(task.session, key)]

        self.write, self.duplicate, self.outer = write, duplicate, outer
        self.all = [write, duplicate, outer]


def test_commits_are_rolled_back_at_the_end(url: str) -> None:
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all) as scope:
        assert tasks.write.apply(args=(key, "a")).get() == 1
        assert tasks.write.apply(args=(key, "b")).get() == 2
        assert scope.run(lambda session: texts(session, key)) == ["a", "b"]
        assert committed(url, key) == []
    assert committed(url, key) == []


def test_a_failed_run_rolls_back_to_its_savepoint(url: str) -> None:
    """An error inside one run does not spoil the scope's transaction (PostgreSQL would
    otherwise refuse every later statement: 'current transaction is aborted')."""
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all) as scope:
        tasks.write.apply(args=(key, "kept")).get()
        entry_id = scope.run(lambda s: s.scalar(select(Entry.id).where(Entry.key == key)))
        failed = tasks.duplicate.apply(args=(key, entry_id))
        assert failed.failed()
        assert isinstance(failed.result, IntegrityError)
        assert tasks.write.apply(args=(key, "after")).get() == 2
        assert scope.run(lambda session: texts(session, key)) == ["kept", "after"]
    assert committed(url, key) == []


def test_uncommitted_work_is_discarded_when_the_run_ends(url: str) -> None:
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all) as scope:
        assert tasks.write.apply(args=(key, "flushed", False)).get() == 1
        assert scope.run(lambda session: texts(session, key)) == []


def test_nested_eager_call_shares_the_scope(url: str) -> None:
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all) as scope:
        inner, seen = tasks.outer.apply(args=(key,)).get()
        # One connection: the inner run sees the outer run's flushed row.
        assert inner == 2
        assert seen == ["outer", "inner"]
        assert scope.run(lambda session: func_count(session, key)) == 2
    assert committed(url, key) == []


async def func_count(session: AsyncSession, key: str) -> int:
    count = await session.scalar(select(func.count()).select_from(Entry).where(Entry.key == key))
    return int(count or 0)


def test_runs_after_the_scope_commit_for_real(url: str) -> None:
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all):
        tasks.write.apply(args=(key, "rolled back")).get()
    assert tasks.write.apply(args=(key, "real")).get() == 1
    assert committed(url, key) == ["real"]


def test_a_task_called_directly_uses_the_scope(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'direct.db'}"
    engine = create_engine(sync_url(url))
    Base.metadata.create_all(engine)
    engine.dispose()
    app, key = make_app(url), uuid.uuid4().hex
    tasks = Tasks(app)
    with rollback_sessions(app, tasks.all) as scope:
        assert tasks.write(key, "direct") == 1
        assert scope.run(lambda session: texts(session, key)) == ["direct"]
    assert committed(url, key) == []


def test_scope_selection_and_errors(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'errors.db'}"
    app = make_app(None)

    @app.task(base=AsyncSessionTask, async_session_url=url, shared=False)
    async def configured() -> None:
        pass

    @app.task(base=AsyncSessionTask, shared=False)
    async def unconfigured() -> None:  # no URL anywhere
        pass

    with rollback_sessions(app, [configured]) as scope:
        assert [cls.__name__ for cls in scope.makers] == ["configured"]
        assert scope.maker() is scope.maker(configured)
        with pytest.raises(LookupError, match="does not run in this rollback scope"):
            scope.maker(unconfigured)
    with (
        pytest.raises(ImproperlyConfigured, match="has no database"),
        rollback_sessions(app, tasks=[unconfigured]),
    ):
        pass

    engine = create_async_engine(url)
    two_binds = async_sessionmaker(binds={Entry: engine})

    @app.task(base=AsyncSessionTask, async_session_maker=two_binds, shared=False)
    async def bound_per_table() -> None:
        pass

    with (
        pytest.raises(ValueError, match="bound to one AsyncEngine"),
        rollback_sessions(app, tasks=[bound_per_table]),
    ):
        pass


# ---- the worker fixture: a real worker per test -------------------------------------------


@pytest.fixture(scope="session")
def sqlite_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """tests.apps.sqlite_app, configured once per test process, with its tables."""
    folder = tmp_path_factory.mktemp("sqlite-app")
    env = sqlite_app.configure(folder)
    engine = create_engine(f"sqlite:///{folder / 'data.db'}")
    models.Base.metadata.create_all(engine)
    engine.dispose()
    return env


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def async_session_app(backend: str) -> Celery:
    return sqlite_app.app if backend == "sqlite" else pg_app.app


@pytest.fixture
def async_session_worker_parameters(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if backend == "sqlite":
        env = request.getfixturevalue("sqlite_state")
        return {"module": "tests.apps.sqlite_app", "pool": "threads", "env": env}
    database_url = request.getfixturevalue("database_url")
    return {"module": "tests.apps.pg_app", "env": {"AST_DATABASE_URL": database_url}}


@pytest.mark.timeout(120)
def test_worker_fixture_runs_the_apps_tasks(
    async_session_worker: WorkerProcess, backend: str
) -> None:
    key = uuid.uuid4().hex
    if backend == "sqlite":
        first = async_session_worker.send(sqlite_app.add_note, key, "one")
        assert first.get(timeout=60) == 1
        assert async_session_worker.send(sqlite_app.add_note, key, "two").get(timeout=60) == 2
    else:
        assert async_session_worker.send(pg_app.bump, key).get(timeout=60) == 1
        assert async_session_worker.send(pg_app.bump, key).get(timeout=60) == 2
    assert async_session_worker.ping()


# ---- the plugin as a user's project sees it: entry point, fixtures, isolation ---------------


@pytest.mark.timeout(180)
def test_plugin_in_a_users_project(pytester: pytest.Pytester) -> None:
    """Two tests commit to the same key: each sees only its own row (rolled back between
    them), every task of the app but a misconfigured one in the scope; a third sends a task
    to a real worker found from ``app.main``."""
    pytester.makepyfile(
        shop=textwrap.dedent(
            """
            import os
            from pathlib import Path

            from celery import Celery
            from sqlalchemy import Integer, String, func, select
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            from async_session_task import AsyncSessionTask
            from async_session_task.testing import file_broker_settings

            class Base(DeclarativeBase):
                pass

            class Item(Base):
                __tablename__ = "items"
                id: Mapped[int] = mapped_column(Integer, primary_key=True)
                name: Mapped[str] = mapped_column(String(40))

            STATE = Path(os.environ.get("SHOP_STATE") or Path(__file__).parent / "state")
            app = Celery("shop")
            app.conf.update(
                file_broker_settings(STATE),
                async_session_url=f"sqlite+aiosqlite:///{STATE / 'shop.db'}",
                broker_connection_retry_on_startup=True,
            )

            async def count(session, name):
                query = select(func.count()).select_from(Item).where(Item.name == name)
                return await session.scalar(query)

            @app.task(base=AsyncSessionTask, async_session_url="sqlite:///sync-driver.db")
            async def misconfigured():  # the rollback fixture leaves it alone
                pass

            @app.task(bind=True, base=AsyncSessionTask)
            async def add_item(self, name):
                self.session.add(Item(name=name))
                await self.session.commit()
                return await count(self.session, name)
            """
        ),
        conftest=textwrap.dedent(
            """
            import os

            import pytest
            from sqlalchemy import create_engine

            import shop

            @pytest.fixture(scope="session", autouse=True)
            def tables():
                engine = create_engine(f"sqlite:///{shop.STATE / 'shop.db'}")
                shop.Base.metadata.create_all(engine)
                engine.dispose()

            @pytest.fixture
            def async_session_app():
                return shop.app

            @pytest.fixture
            def async_session_worker_parameters():
                path = os.pathsep.join([str(shop.STATE.parent), os.environ.get("PYTHONPATH", "")])
                return {"pool": "threads", "env": {"PYTHONPATH": path}}
            """
        ),
        test_shop=textwrap.dedent(
            """
            import shop

            def test_first(async_session_rollback):
                assert [c.__name__ for c in async_session_rollback.makers] == ["add_item"]
                assert shop.add_item.apply(args=("pen",)).get() == 1
                assert async_session_rollback.run(lambda s: shop.count(s, "pen")) == 1

            def test_second_sees_nothing_of_the_first(async_session_rollback):
                assert shop.add_item.apply(args=("pen",)).get() == 1

            def test_end_to_end(async_session_worker):
                result = async_session_worker.send(shop.add_item, "ink")
                assert result.get(timeout=60) == 1
            """
        ),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", timeout=150)
    result.assert_outcomes(passed=3)


# ---- the filesystem broker: a message is never read half written ---------------------------


def test_file_broker_never_shows_a_message_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader polling while a message is written finds nothing, not an empty file: kombu's
    own transport hands it ``b""`` there, which ends a worker with a JSONDecodeError
    (celery/kombu#1551, seen in this project's CI)."""
    from async_session_task import _filebroker

    app = Celery("file-broker", set_as_current=False)
    app.conf.update(file_broker_settings(tmp_path))
    polled: list[str] = []
    with app.connection_for_write() as writer, app.connection_for_read() as reader:
        serialize: Callable[[Any], str] = vars(_filebroker)["dumps"]

        def dumps_while_a_reader_polls(payload: Any) -> str:
            # Runs after the message's file is opened and before its bytes are written.
            try:
                polled.append(reader.default_channel._get("jobs")["body"])
            except Empty:
                polled.append("nothing yet")
            return serialize(payload)

        monkeypatch.setattr(f"{_filebroker.__name__}.dumps", dumps_while_a_reader_polls)
        writer.default_channel._put("jobs", {"body": "first"})
        monkeypatch.undo()
        assert polled == ["nothing yet"]
        assert reader.default_channel._get("jobs") == {"body": "first"}
