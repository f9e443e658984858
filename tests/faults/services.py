"""Private PostgreSQL and Redis servers that fault tests may stop, restart and break.

The shared services on the standard ports serve other test runs at the same time: they are
never touched. Each test process gets its own cluster (``initdb`` into a temporary
directory, on a free port) and its own ``redis-server``; PgBouncer is the benchmark's
(``benchmarks/_pgbouncer.py``), with the admin console's ``SHOW`` added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psycopg

from benchmarks import _pgbouncer
from benchmarks._pgbouncer import PgBouncer, as_postgres, free_port, reachable

PG_BIN = Path(os.environ.get("AST_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: A role that must authenticate with a password (scram-sha-256); every other role is trusted.
SECRET_ROLE = "ast_secret"


def missing() -> str | None:
    """Why private servers cannot be started here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL server binaries not found in {PG_BIN} (set AST_PG_BIN)"
    if shutil.which("redis-server") is None:
        return "redis-server not found"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return None


class PrivatePostgres:
    """A PostgreSQL cluster of our own: ``stop()``, ``start()``, ``restart()`` at will."""

    def __init__(self, database: str = "faults", settings: dict[str, str] | None = None) -> None:
        #: Server settings given on the command line, e.g. ``{"max_connections": "10"}``.
        self.settings = settings or {}
        self.root = Path(tempfile.mkdtemp(prefix="ast-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.database = database
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "root", "--auth=trust", "-N")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {SECRET_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        self.start()
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*as_postgres(), str(PG_BIN / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
        )

    def _ctl(self, action: str, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        log = str(self.root / "postgres.log")
        self._run("pg_ctl", action, "-D", str(self.data), "-w", "-o", options, "-l", log, *args)

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session (clients see "terminating connection due to
        administrator command"); ``immediate`` drops them like a crash."""
        self._ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self._ctl("restart", "-m", mode)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} user=root dbname={database or self.database}"

    @property
    def url(self) -> str:
        """The URL a worker uses (asyncpg)."""
        return f"postgresql+asyncpg://root@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql)


def pgbouncer_missing() -> str | None:
    """Why a private PgBouncer cannot be started here, or None."""
    return missing() or _pgbouncer.missing()


class Server(Protocol):
    """A PostgreSQL server PgBouncer can front: a PrivatePostgres, or the shared one."""

    @property
    def port(self) -> int: ...
    @property
    def database(self) -> str: ...


ServerT = TypeVar("ServerT", bound=Server)


class PrivatePgBouncer(PgBouncer, Generic[ServerT]):
    """The benchmark's PgBouncer (transaction pooling) in front of ``postgres``; ``root``
    may use the admin console (``show("POOLS")``)."""

    def __init__(
        self, postgres: ServerT, pool_size: int = 4, settings: dict[str, str] | None = None
    ) -> None:
        self.postgres = postgres
        super().__init__(postgres.port, postgres.database, pool_size=pool_size, settings=settings)

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console (simple query protocol only: psql)."""
        process = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "root", "-d", "pgbouncer",
             "--csv", "-c", f"SHOW {what}"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        header, *rows = process.stdout.splitlines()
        names = header.split(",")
        return [dict(zip(names, row.split(","), strict=True)) for row in rows]


class PrivateRedis:
    """A ``redis-server`` of our own, without persistence: a restart empties it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ast-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.root),
            "--logfile", str(self.root / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not reachable(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
