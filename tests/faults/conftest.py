"""Fixtures of the fault tests: private servers and real workers that use them."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine

from async_session_task.testing import WorkerProcess, worker_process
from tests.conftest import unavailable
from tests.faults import app as fault_app
from tests.faults.services import PrivatePostgres, PrivateRedis, missing


@pytest.fixture(scope="session")
def private_servers() -> None:
    unavailable(missing(), "fault test")


@pytest.fixture(scope="session")
def private_postgres(private_servers: None) -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test process, with the fault app's tables."""
    postgres = PrivatePostgres()
    try:
        engine = create_engine(postgres.url.replace("+asyncpg", "+psycopg"))
        fault_app.Base.metadata.create_all(engine)
        engine.dispose()
        yield postgres
    finally:
        postgres.destroy()


@pytest.fixture(scope="session")
def private_redis(private_servers: None) -> Iterator[PrivateRedis]:
    """A Redis of this test process: the fault app's broker and result backend."""
    redis = PrivateRedis()
    # Before the app's first use in this process: it connects lazily.
    fault_app.app.conf.update(broker_url=redis.url, result_backend=redis.url)
    try:
        yield redis
    finally:
        redis.destroy()


class FaultWorker:
    """A real worker of the fault app, its connections tagged with ``application_name``."""

    def __init__(self, worker: WorkerProcess, application_name: str, pg: PrivatePostgres) -> None:
        self.worker = worker
        self.application_name = application_name
        self.pg = pg

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        return self.worker.send(task, *args, **options)

    def connections(self) -> list[str]:
        """States of this worker's PostgreSQL connections."""
        rows = self.pg.query(
            "select coalesce(state, '') from pg_stat_activity where application_name = %s",
            self.application_name,
        )
        return [row[0] for row in rows]

    def entries(self, key: str) -> list[str]:
        rows = self.pg.query("select text from entries where key = %s order by id", key)
        return [row[0] for row in rows]


StartFaultWorker = Callable[..., contextlib.AbstractContextManager[FaultWorker]]


@pytest.fixture
def start_fault_worker(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis
) -> StartFaultWorker:
    """``with start_fault_worker(pool="threads", engine_options={...}) as w: ...``"""

    @contextlib.contextmanager
    def start(
        pool: str = "prefork",
        concurrency: int = 2,
        engine_options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> Iterator[FaultWorker]:
        name = uuid.uuid4().hex[:12]
        application_name = f"ast-{name}"
        options = {
            "connect_args": {
                "server_settings": {"application_name": application_name},
                "timeout": 10,
            },
            **(engine_options or {}),
        }
        worker_env = {
            "AST_DATABASE_URL": private_postgres.url,
            "AST_BROKER_URL": private_redis.url,
            "AST_ENGINE_OPTIONS": json.dumps(options),
            **(env or {}),
        }
        with worker_process(
            fault_app.app,
            "tests.faults.app",
            pool=pool,
            concurrency=concurrency,
            env=worker_env,
            name=name,
        ) as worker:
            yield FaultWorker(worker, application_name, private_postgres)

    return start
