"""What the tests share besides fixtures: skips without services, real workers and their
PostgreSQL connections, a local HTTP server, subprocesses run as a user's."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import celery.result
import psycopg
import pytest
from celery import Celery

from async_session_task.testing import SHUTDOWN_PROBLEMS, WorkerProcess, worker_process
from tests.apps import pg_app

if TYPE_CHECKING:
    from tests.faults.services import PrivatePostgres

REQUIRE_SERVICES = os.environ.get("ASYNC_SESSION_TASK_REQUIRE_SERVICES") == "1"

if celery.VERSION < (5, 6):
    # Celery 5.5's Redis result consumer unsubscribes from AsyncResult.__del__; a result
    # collected during a pubsub call re-enters redis-py and hangs this test process (5.6
    # defers the unsubscribe). Results here are few and short-lived: keep them subscribed.
    celery.result.AsyncResult.__del__ = lambda self: None
PG_ADMIN = "host=127.0.0.1 port=5432 user=root dbname=postgres"
SERVICES = {"PostgreSQL": ("127.0.0.1", 5432), "Redis": ("127.0.0.1", 6379)}


BROKERS = {
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
SERVICES_OPTIONAL = {"RabbitMQ": ("127.0.0.1", 5672)}


ROOT = Path(__file__).resolve().parent.parent


def run_python(
    *args: str, env: dict[str, str], timeout: float = 110
) -> subprocess.CompletedProcess[str]:
    """``python *args`` in the repository's root, as a user's process; never raises on its
    exit code (the caller asserts on it, with the output)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def unavailable(reason: str | None, kind: str = "service test") -> None:
    """Skip with ``reason`` (or, when services are required, fail) if there is one."""
    if reason:
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason}, and ASYNC_SESSION_TASK_REQUIRE_SERVICES=1")
        pytest.skip(f"{reason} ({kind})")


def require(name: str, address: tuple[str, int]) -> None:
    """Skip (or, when services are required, fail) unless ``name`` answers at ``address``."""
    if not reachable(address):
        unavailable(f"{name} not reachable on {address[0]}:{address[1]}")


@functools.cache
def client_app(broker_url: str) -> Celery:
    """An app that sends tasks (by name) and pings workers through ``broker_url``."""
    return Celery("client", broker=broker_url, backend=BROKERS["redis"], set_as_current=False)


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def pg_query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def connections_of(database_url: str, application_name: str) -> list[str]:
    """States of the connections a worker holds (``application_name`` tags them)."""
    rows = pg_query(
        database_url,
        "select coalesce(state, '') from pg_stat_activity where application_name = %s",
        application_name,
    )
    return [row[0] for row in rows]


class ServiceWorker:
    """A real worker on Redis and PostgreSQL, its connections tagged with ``application_name``."""

    def __init__(self, worker: WorkerProcess, application_name: str, database_url: str) -> None:
        self.worker = worker
        self.application_name = application_name
        self.database_url = database_url

    @property
    def queue(self) -> str:
        return self.worker.queue

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        return self.worker.send(task, *args, **options)

    def connections(self) -> list[str]:
        """States of this worker's PostgreSQL connections."""
        return connections_of(self.database_url, self.application_name)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
        """Until ``condition()`` holds; pinging the worker between checks is the pause, and it
        proves the worker still answers."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}; worker log:\n{self.worker.log[-4000:]}")
            self.worker.ping(timeout=0.1)

    def wait_for_log(self, text: str) -> str:
        """The worker's log, once it holds ``text``."""
        self.wait_for(lambda: text in self.worker.log, f"{text!r} never logged")
        return self.worker.log


def wait_for_state(result: Any, state: str, timeout: float = 60) -> None:
    """Wait (on the result backend) until the task reports ``state``."""
    deadline = time.monotonic() + timeout
    while result.state != state:
        assert not result.ready(), f"{result.state}: {result.result!r}"
        assert time.monotonic() < deadline, f"never reached {state}"
        time.sleep(0.02)


StartWorker = Callable[..., contextlib.AbstractContextManager[ServiceWorker]]


@contextlib.contextmanager
def service_worker(
    database_url: str,
    pool: str = "prefork",
    concurrency: int = 2,
    engine_options: dict[str, Any] | None = None,
    module: str = "tests.apps.pg_app",
    app: Any = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    broker: str = "redis",
    connect_args: dict[str, Any] | None = None,
    name: str | None = None,
) -> Iterator[ServiceWorker]:
    """A real worker on ``broker`` (a name in :data:`BROKERS`, or a URL) and the PostgreSQL
    database ``database_url``; ``connect_args`` add to asyncpg's (the tag is always there)."""
    if broker == "amqp":
        require("RabbitMQ", SERVICES_OPTIONAL["RabbitMQ"])
        app = client_app(BROKERS[broker])
    name = name or uuid.uuid4().hex[:12]
    application_name = f"ast-{name}"
    options = {
        "connect_args": {
            "server_settings": {"application_name": application_name},
            **(connect_args or {}),
        },
        **(engine_options or {}),
    }
    worker_env = {
        "AST_BROKER_URL": BROKERS.get(broker, broker),
        "AST_DATABASE_URL": database_url,
        "AST_ENGINE_OPTIONS": json.dumps(options),
        **(env or {}),
    }
    with worker_process(
        app or pg_app.app,
        module,
        pool=pool,
        concurrency=concurrency,
        env=worker_env,
        args=args,
        name=name,
    ) as worker:
        yield ServiceWorker(worker, application_name, database_url)


class FaultWorker(ServiceWorker):
    """A real worker of the fault app (``tests/faults/app.py``) on a private PostgreSQL."""

    def __init__(self, worker: WorkerProcess, application_name: str, pg: PrivatePostgres) -> None:
        super().__init__(worker, application_name, pg.url)
        self.pg = pg

    def entries(self, key: str) -> list[str]:
        rows = self.pg.query("select text from entries where key = %s order by id", key)
        return [row[0] for row in rows]


StartFaultWorker = Callable[..., contextlib.AbstractContextManager[FaultWorker]]


class HTTPServer:
    """A local HTTP/1.1 server: ``/slow?delay=s`` answers after ``delay`` seconds. It counts
    requests, the TCP connections they came on, and the most requests in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.connections: set[tuple[str, int]] = set()
        self.in_flight = 0
        self.most_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client's pool reuses connections

            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                with server.lock:
                    server.requests += 1
                    server.connections.add(self.client_address)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    time.sleep(float(query.get("delay", ["0"])[0]))
                finally:
                    with server.lock:
                        server.in_flight -= 1
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def notes(worker: ServiceWorker, key: str) -> list[str]:
    rows = pg_query(worker.database_url, "select text from notes where key = %s order by id", key)
    return [row[0] for row in rows]


def assert_no_open_transaction(worker: ServiceWorker) -> None:
    states = worker.connections()
    assert not [s for s in states if s.startswith("idle in transaction")], states


def assert_clean_stop(worker: ServiceWorker) -> None:
    """After a warm shutdown nothing of the worker is left in PostgreSQL."""
    assert worker.worker.stop() == 0
    assert worker.connections() == []
    log = worker.worker.log
    assert not [noise for noise in SHUTDOWN_PROBLEMS if noise in log], log[-3000:]
    after_shutdown = log.rpartition("Warm shutdown")[2]
    assert "Traceback" not in after_shutdown, after_shutdown


def runtime_stats(app: Any, worker: ServiceWorker) -> dict[str, Any]:
    """``celery inspect async_session_stats`` of the worker's main process."""
    node = worker.worker.nodename
    replies = app.control.broadcast(
        "async_session_stats", destination=[node], reply=True, timeout=5
    )
    stats: dict[str, Any] = next(reply[node] for reply in replies if node in reply)
    return stats
