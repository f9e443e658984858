"""Database passwords never appear in what the library logs, raises, returns or repr()s.

A distinctive password is put in every URL; configuration errors, connection failures and a
successful run are then searched for it: in-process (messages, tracebacks, logs, warnings)
and on a real worker (its whole output and every stored result).
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from sqlalchemy import text

from async_session_task import AsyncSessionTask
from async_session_task._config import Settings
from async_session_task._worker import check_worker_tasks
from async_session_task.testing import worker_process
from tests.apps import misconfigured_app
from tests.faults.services import SECRET_ROLE, PrivatePostgres, missing
from tests.helpers import StartWorker, unavailable

PASSWORD = f"Sup3rS3cretPw-{uuid.uuid4().hex[:10]}"
URL = f"postgresql+asyncpg://root:{PASSWORD}@127.0.0.1:1/db"
RIGHT_PASSWORD = f"Right-{uuid.uuid4().hex[:10]}"

#: (settings as task options, the error the run fails with)
CASES: dict[str, tuple[dict[str, Any], type[BaseException]]] = {
    "sync driver": (
        {"async_session_url": URL.replace("+asyncpg", "+psycopg2")},
        ImproperlyConfigured,
    ),
    "no driver": ({"async_session_url": URL.replace("+asyncpg", "")}, ImproperlyConfigured),
    "unknown driver": (
        {"async_session_url": URL.replace("+asyncpg", "+nodriver")},
        ImproperlyConfigured,
    ),
    "bad port": ({"async_session_url": URL.replace(":1/", ":port/")}, ImproperlyConfigured),
    "password with an @": (
        {"async_session_url": URL.replace(PASSWORD, f"{PASSWORD}@x:y")},
        ImproperlyConfigured,
    ),
    "engine option": (
        {"async_session_url": URL, "async_session_engine_options": {"pool_sizee": 1}},
        ImproperlyConfigured,
    ),
    "engine option value": (
        {"async_session_url": URL, "async_session_engine_options": {"pool_size": "x"}},
        ImproperlyConfigured,
    ),
    "session option": (
        {"async_session_url": URL, "async_session_options": {"bind": 1}},
        ImproperlyConfigured,
    ),
    "both": ({"async_session_url": URL, "async_session_maker": "x:y"}, ImproperlyConfigured),
    "connection refused": ({"async_session_url": URL}, OSError),
    "unknown host": ({"async_session_url": URL.replace("127.0.0.1:1", "no-such.invalid")}, OSError),
}


@pytest.fixture(scope="module")
def scram_postgres(services: None) -> Iterator[PrivatePostgres]:
    """A private cluster where SECRET_ROLE must give its password (scram-sha-256)."""
    unavailable(missing(), "service test")
    postgres = PrivatePostgres()
    try:
        postgres.execute(f"CREATE ROLE {SECRET_ROLE} LOGIN PASSWORD '{RIGHT_PASSWORD}'")
        yield postgres
    finally:
        postgres.destroy()


def assert_hidden(*texts: str) -> None:
    for found in texts:
        assert PASSWORD not in found, found


@pytest.mark.parametrize("case", CASES)
def test_errors_logs_and_reprs_hide_the_password(
    case: str, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    options, error = CASES[case]
    app = Celery(f"secrets-{uuid.uuid4().hex[:8]}", set_as_current=False)

    @app.task(bind=True, base=AsyncSessionTask, shared=False, **options)
    async def task(self: AsyncSessionTask) -> Any:
        return await self.session.scalar(text("select 1"))

    with caplog.at_level(logging.DEBUG):
        check_worker_tasks(app)
        result = task.apply()
    assert result.state == "FAILURE"
    with pytest.raises(Exception) as raised:  # noqa: PT011  # the type is checked below
        result.get()
    # SQLAlchemy wraps connection errors in its own DBAPIError; the cause is the OSError.
    assert isinstance(raised.value, error) or isinstance(raised.value.__cause__, error), (
        raised.value
    )
    formatted = "".join(traceback.format_exception(raised.value))
    assert_hidden(
        formatted,
        result.traceback or "",
        repr(raised.value),
        caplog.text,
        *(str(w.message) for w in recwarn),
        repr(Settings.of(task)),
    )
    if error is ImproperlyConfigured:
        # worker_init reported the same problem, as hidden.
        assert f"Task {task.name} will fail every run" in caplog.text


@pytest.mark.services
@pytest.mark.timeout(180)
def test_real_worker_output_and_results_hide_the_password(start_worker: StartWorker) -> None:
    tasks = {**misconfigured_app.broken_tasks(), **misconfigured_app.UNREACHABLE}
    with start_worker(
        pool="prefork",
        concurrency=2,
        module="tests.apps.misconfigured_app",
        app=misconfigured_app.app,
        env={"AST_SECRET_PASSWORD": PASSWORD},
    ) as worker:
        failed = {name: worker.send(task) for name, task in tasks.items()}
        ok = worker.send(misconfigured_app.connects).get(timeout=60)
        outcomes = {name: r.get(timeout=60, propagate=False) for name, r in failed.items()}
        tracebacks = [r.traceback or "" for r in failed.values()]
        assert worker.worker.stop() == 0
        log = worker.worker.log
    # Every run failed as intended (the password was in each URL it was given)...
    assert all(
        isinstance(outcomes[name], ImproperlyConfigured) for name in misconfigured_app.EXPECTED
    )
    assert all(isinstance(outcomes[name], Exception) for name in misconfigured_app.UNREACHABLE)
    # ...the valid one connected with it, and SQLAlchemy shows the URL masked...
    assert ok["user"] == "root"
    assert ":***@" in ok["url"]
    assert ":***@" in ok["engine"]
    # ...and nothing the worker wrote or stored shows it.
    assert "Traceback" in log
    assert_hidden(log, repr(ok), *map(repr, outcomes.values()), *tracebacks)


@pytest.mark.services
@pytest.mark.timeout(180)
def test_wrong_password_is_not_shown(scram_postgres: PrivatePostgres) -> None:
    """Password authentication fails; neither password reaches the log or the result."""
    url = f"postgresql+asyncpg://{SECRET_ROLE}@127.0.0.1:{scram_postgres.port}/faults"
    with worker_process(
        misconfigured_app.app,
        "tests.apps.misconfigured_app",
        concurrency=1,
        env={"AST_DATABASE_URL": url, "AST_SECRET_PASSWORD": PASSWORD},
    ) as worker:
        failed = worker.send(misconfigured_app.connects)
        error = failed.get(timeout=60, propagate=False)
        assert worker.stop() == 0
        log = worker.log
    assert f'password authentication failed for user "{SECRET_ROLE}"' in str(error)
    assert_hidden(log, repr(error), failed.traceback or "")
    assert RIGHT_PASSWORD not in log


def test_right_password_is_required(scram_postgres: PrivatePostgres) -> None:
    """The check above means something: the role does authenticate, with its password."""
    app = Celery(f"secrets-{uuid.uuid4().hex[:8]}", set_as_current=False)
    url = f"postgresql+asyncpg://{SECRET_ROLE}:{RIGHT_PASSWORD}@127.0.0.1:{scram_postgres.port}"

    @app.task(bind=True, base=AsyncSessionTask, shared=False, async_session_url=f"{url}/faults")
    async def whoami(self: AsyncSessionTask) -> Any:
        return await self.session.scalar(text("select current_user"))

    assert whoami.apply().get() == SECRET_ROLE
