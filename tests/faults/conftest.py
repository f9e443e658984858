"""Fixtures of the fault tests: private servers and real workers that use them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine

from tests.faults import app as fault_app
from tests.faults.services import PrivatePostgres, PrivateRedis, missing
from tests.helpers import FaultWorker, StartFaultWorker, service_worker, unavailable


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


@pytest.fixture
def start_fault_worker(
    private_postgres: PrivatePostgres, private_redis: PrivateRedis
) -> StartFaultWorker:
    """``with start_fault_worker(pool="threads", engine_options={...}) as w: ...``"""

    @contextlib.contextmanager
    def start(**options: Any) -> Iterator[FaultWorker]:
        with service_worker(
            private_postgres.url,
            app=fault_app.app,
            module="tests.faults.app",
            broker=private_redis.url,
            connect_args={"timeout": 10},
            **options,
        ) as worker:
            yield FaultWorker(worker.worker, worker.application_name, private_postgres)

    return start
