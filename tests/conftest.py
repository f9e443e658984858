"""Shared fixtures: services (PostgreSQL, Redis), a database per test process, real workers."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine

from tests.apps import models
from tests.helpers import (
    PG_ADMIN,
    SERVICES,
    HTTPServer,
    StartWorker,
    reachable,
    service_worker,
    unavailable,
)


@pytest.fixture(scope="session")
def services() -> None:
    """Skip (or, with ASYNC_SESSION_TASK_REQUIRE_SERVICES=1, fail) without PostgreSQL/Redis."""
    missing = [name for name, address in SERVICES.items() if not reachable(address)]
    if missing:
        unavailable(f"{' and '.join(missing)} not reachable on 127.0.0.1")


@pytest.fixture(scope="session")
def database_url(services: None) -> Iterator[str]:
    """A fresh PostgreSQL database for this test process, with the test app's tables."""
    # Unique per test process: parallel runs (xdist, or two checkouts) never share one.
    name = f"ast_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    engine = create_engine(f"postgresql+psycopg://root@127.0.0.1/{name}")
    models.Base.metadata.create_all(engine)
    engine.dispose()
    yield f"postgresql+asyncpg://root@127.0.0.1/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def start_worker(database_url: str) -> StartWorker:
    """``with start_worker(pool="threads", concurrency=8) as w: w.send(task, ...)``."""
    return functools.partial(service_worker, database_url)


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    server = HTTPServer()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
