"""``celery -A proj async-session check`` and ``python -m async_session_task check``, run as
commands against the test database, a refused port and a private PgBouncer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery.concurrency import ALIASES
from sqlalchemy.engine import make_url

from async_session_task import _pools
from tests.faults.services import PrivatePgBouncer, PrivatePostgres, missing, pgbouncer_missing
from tests.helpers import pg_query, unavailable

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "check-Secret-7f3a"
APP = "tests.apps.check_app"


def check(database_url: str, *args: str, celery: bool = False, **env: str) -> tuple[int, list[str]]:
    """Run the check of ``tests.apps.check_app`` on ``database_url`` (with a password the
    server ignores); its exit status and the lines it printed."""
    url = make_url(database_url).set(password=PASSWORD).render_as_string(hide_password=False)
    command = (
        ["-m", "celery", "-A", APP, "async-session", "check"]
        if celery
        else ["-m", "async_session_task", "check", "-A", APP]
    )
    process = subprocess.run(
        [sys.executable, *command, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "AST_CHECK_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = process.stdout + process.stderr
    assert PASSWORD not in output
    return process.returncode, output.splitlines()


def line(lines: list[str], start: str) -> str:
    """The one line that starts with ``start`` (status and check, as printed)."""
    found = [text for text in lines if text.startswith(start)]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


def test_a_healthy_app_passes(database_url: str) -> None:
    code, lines = check(
        database_url,
        "-P",
        "threads",
        "-c",
        "8",
        AST_CHECK_ENGINE_OPTIONS='{"pool_size": 4, "max_overflow": 4, "pool_pre_ping": true,'
        ' "connect_args": {"server_settings": {"statement_timeout": "20000"}}}',
        AST_CHECK_SOFT_TIME_LIMIT="30",
    )
    assert code == 0, "\n".join(lines)
    assert line(lines, "OK     worker ").endswith("check_app: -P threads -c 8")
    assert "1 of 1 tasks resolve, 1 engine(s)" in line(lines, "OK     session factories ")
    database = line(lines, "OK     database ")
    assert f"root:***@127.0.0.1/{make_url(database_url).database}: connected in" in database
    assert ", PostgreSQL 15" in database
    assert "pool_size 4 + max_overflow 4 for 8 run(s)" in line(lines, "OK     pool ")
    assert "1 process(es) x 8 = 8 <= " in line(lines, "OK     connection budget ")
    assert 'database "pgbouncer" does not exist' in line(lines, "OK     pgbouncer ")
    pre_ping = "on (socket check; SELECT 1 after 1 s idle)"
    assert line(lines, "OK     pool_pre_ping ").endswith(pre_ping)
    assert "20000 ms <= 30.0 s (check.query)" in line(lines, "OK     statement_timeout ")
    assert line(lines, "SKIP   lifespan ").endswith("not configured")
    assert lines[-1] == "no errors"


def test_an_unreachable_database(database_url: str) -> None:
    url = make_url(database_url).set(port=1).render_as_string(hide_password=False)
    code, lines = check(url, celery=True)
    assert code == 1
    assert "cannot connect to postgresql+asyncpg://root:***@127.0.0.1:1/" in line(
        lines, "ERROR  database "
    )
    assert "ConnectionRefusedError" in line(lines, "ERROR  database ")
    assert lines[-1] == "1 error(s)"


def test_a_sync_driver(database_url: str) -> None:
    url = database_url.replace("+asyncpg", "+psycopg2")
    code, lines = check(url)
    assert code == 1
    assert "0 of 1 tasks resolve" in line(lines, "ERROR  session factories ")
    assert "uses 'psycopg2', a sync driver; use 'postgresql+asyncpg://'" in line(
        lines, "ERROR  task check.query "
    )


def test_a_budget_over_max_connections(database_url: str) -> None:
    """150 prefork children of one connection each: more than PostgreSQL's 100."""
    options = '{"pool_size": 1, "max_overflow": 1}'
    code, lines = check(
        database_url, "-P", "prefork", "-c", "150", celery=True, AST_CHECK_ENGINE_OPTIONS=options
    )
    assert code == 1
    budget = line(lines, "ERROR  connection budget ")
    assert "127.0.0.1:5432: 150 process(es) x 1 = 150 (the pools could open 300) > " in budget
    assert "(max_connections 100 - 3 reserved - " in budget
    assert lines[-1] == "1 error(s)"


def test_one_server_under_two_spellings(database_url: str) -> None:
    """Two tasks on one server, one URL with ``localhost`` and no port, one with
    ``127.0.0.1:5432``: the server's budget adds both (50 + 50 > what 100 connections leave)."""
    url = make_url(database_url).set(password=PASSWORD)
    first, second = url.set(host="localhost", port=None), url.set(host="127.0.0.1", port=5432)
    code, lines = check(
        first.render_as_string(hide_password=False),
        "-P",
        "prefork",
        "-c",
        "50",
        celery=True,
        AST_CHECK_SECOND_URL=second.render_as_string(hide_password=False),
        AST_CHECK_ENGINE_OPTIONS='{"pool_size": 1, "max_overflow": 0}',
    )
    assert code == 1, "\n".join(lines)
    assert "2 of 2 tasks resolve, 2 engine(s)" in line(lines, "OK     session factories ")
    assert [text for text in lines if "connection budget" in text] == [
        line(lines, "ERROR  connection budget ")
    ]
    budget = line(lines, "ERROR  connection budget ")
    assert (
        "localhost:5432, 127.0.0.1:5432 (one server): 50 process(es) x (1 + 1) = 100 > " in budget
    )
    assert lines[-1] == "1 error(s)"


@pytest.fixture
def guarded_postgres(services: None) -> Iterator[PrivatePostgres]:
    """A private cluster of 20 connections with a role ``plain`` that has no grant, and
    whose ``test`` database does not let it read the system identifier (as some operators
    revoke ``pg_control_system()`` from PUBLIC)."""
    unavailable(missing(), "service test")
    postgres = PrivatePostgres("test", {"max_connections": "20"})
    try:
        postgres.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
        postgres.execute("CREATE ROLE plain LOGIN")
        yield postgres
    finally:
        postgres.destroy()


def test_one_server_for_a_plain_user(guarded_postgres: PrivatePostgres) -> None:
    """A user with no grant, on a server of 20 connections reached under two spellings of
    its own port: one server (10 + 10 > what 20 leave)."""
    url = make_url(f"postgresql+asyncpg://plain@localhost:{guarded_postgres.port}/test")
    code, lines = check(
        url.render_as_string(hide_password=False),
        "-P",
        "prefork",
        "-c",
        "10",
        AST_CHECK_SECOND_URL=url.set(host="127.0.0.1").render_as_string(hide_password=False),
        AST_CHECK_ENGINE_OPTIONS='{"pool_size": 1, "max_overflow": 0}',
    )
    assert code == 1, "\n".join(lines)
    assert len([text for text in lines if text.startswith("OK     database ")]) == 2
    budget = line(lines, "ERROR  connection budget ")
    server = f"localhost:{guarded_postgres.port}, 127.0.0.1:{guarded_postgres.port}"
    assert f"{server} (one server): 10 process(es) x (1 + 1) = 20 > " in budget
    assert "(max_connections 20 - 3 reserved - " in budget
    assert lines[-1] == "1 error(s)"


def test_processes_is_prefork(database_url: str) -> None:
    """``-P processes`` is Celery's other name for prefork: a process per run."""
    code, lines = check(database_url, "-P", "processes", "-c", "3")
    assert code == 0, "\n".join(lines)
    assert line(lines, "OK     worker ").endswith("check_app: -P prefork -c 3")
    assert "3 process(es) x 1 = 3" in line(lines, "OK     connection budget ")


@pytest.mark.parametrize("pool", _pools.POOLS)
def test_pool_names_are_celerys(pool: str) -> None:
    """A pool's ``-P`` name and the import path Celery resolves it to name the same pool."""
    assert _pools.pool_name(ALIASES[pool]) == _pools.pool_name(pool)


@dataclass
class SharedServer:
    port: int
    database: str


@pytest.fixture(scope="module")
def pgbouncer_url(database_url: str) -> Iterator[str]:
    """A private PgBouncer in transaction pooling in front of the test database."""
    unavailable(pgbouncer_missing())
    url = make_url(database_url)
    bouncer = PrivatePgBouncer(SharedServer(url.port or 5432, str(url.database)), pool_size=2)
    try:
        yield url.set(port=bouncer.port).render_as_string(hide_password=False)
    finally:
        bouncer.destroy()


def test_pgbouncer_without_the_preset(pgbouncer_url: str) -> None:
    code, lines = check(pgbouncer_url, "-P", "threads", "-c", "4")
    assert code == 1
    assert (
        "detected, statement cache not disabled (statement_cache_size, "
        "prepared_statement_cache_size, prepared_statement_name_func not set)"
    ) in line(lines, "ERROR  pgbouncer           PgBouncer 1.")
    assert "client connections through PgBouncer" in line(lines, "OK     connection budget ")
    assert lines[-1] == "1 error(s)"


def test_pgbouncer_with_the_preset(pgbouncer_url: str) -> None:
    code, lines = check(pgbouncer_url, "-P", "threads", "-c", "4", AST_CHECK_PGBOUNCER="1")
    assert code == 0, "\n".join(lines)
    assert line(lines, "OK     pgbouncer ").endswith("; statement cache off")


@pytest.mark.parametrize(
    ("lifespan", "expected"),
    [
        ("lifespan", "OK     lifespan            entered and exited in "),
        ("failing_lifespan", "ERROR  lifespan            "),
    ],
)
def test_the_lifespan_enters_and_exits(database_url: str, lifespan: str, expected: str) -> None:
    code, lines = check(database_url, AST_CHECK_LIFESPAN=f"{APP}:{lifespan}")
    assert code == (0 if expected.startswith("OK") else 1)
    found = line(lines, expected)
    if lifespan == "failing_lifespan":
        assert "ConnectionError: check_app: the lifespan's service is down" in found


def test_the_runs_table_of_idempotent_tasks(database_url: str) -> None:
    """Reported with its size; old markers counted, then deleted by ``--cleanup``."""
    old = uuid.uuid4().hex
    pg_query(
        database_url,
        "insert into async_session_runs values (%s, 'check.once', %s, now() - interval '8 days')"
        " returning key",
        old,
        old,
    )
    code, lines = check(database_url, AST_CHECK_IDEMPOTENT="1")
    assert code == 0, "\n".join(lines)
    found = line(lines, "OK     runs table ")
    assert re.search(r"async_session_runs: \d+ marker\(s\), \d+ kB; [1-9]\d* older than", found)
    code, lines = check(database_url, "--cleanup", AST_CHECK_IDEMPOTENT="1")
    assert code == 0, "\n".join(lines)
    assert re.search(r"deleted [1-9]\d* older than retention", line(lines, "OK     runs table "))
    assert pg_query(database_url, "select key from async_session_runs where key = %s", old) == []


def test_a_missing_runs_table(database_url: str) -> None:
    elsewhere = make_url(database_url).set(database="postgres").render_as_string(False)
    code, lines = check(elsewhere, AST_CHECK_IDEMPOTENT="1")
    assert code == 1
    assert "async_session_runs missing: add runs_table(Base.metadata)" in line(
        lines, "ERROR  runs table "
    )
    code, lines = check(elsewhere)  # no idempotent task: no such row
    assert not [text for text in lines if "runs table" in text]


def test_the_outbox_backlog_and_dead_letters(database_url: str) -> None:
    pending, dead = uuid.uuid4().hex, uuid.uuid4().hex
    for key, dead_at in ((pending, "null"), (dead, "now()")):
        pg_query(
            database_url,
            "insert into async_session_outbox (id, task_name, content_type, content_encoding,"
            f" body, created_at, dead_at) values (%s, 't', 'application/json', 'utf-8', 'x',"
            f" now() - interval '1 hour', {dead_at}) returning id",
            key,
        )
    try:
        code, lines = check(database_url)
        assert code == 0, "\n".join(lines)
        found = line(lines, "WARN   outbox ")
        assert re.search(r"async_session_outbox: [1-9]\d* pending, the oldest for \d+ s", found)
        assert re.search(r"; [1-9]\d* dead letter\(s\)", found)
    finally:
        pg_query(
            database_url, "delete from async_session_outbox where id in (%s, %s) returning id",
            pending, dead,
        )  # fmt: skip


def test_a_missing_outbox_is_an_error_only_where_calls_are_durable(database_url: str) -> None:
    elsewhere = make_url(database_url).set(database="postgres").render_as_string(False)
    code, lines = check(elsewhere, AST_CHECK_OUTBOX="1")
    assert code == 1
    assert "async_session_outbox missing: add outbox_table(Base.metadata)" in line(
        lines, "ERROR  outbox "
    )
    code, lines = check(elsewhere)
    assert code == 0, "\n".join(lines)
    assert line(lines, "SKIP   outbox ")
