"""A PgBouncer of our own, in transaction pooling mode, in front of a PostgreSQL server.

Started by ``nox -s bench`` for its PgBouncer row and by the tests (``tests/faults``), on a
free port, with a configuration written to a temporary directory; stopped by ``destroy()``.
Every client logs in as the server's user without a password (``auth_type = trust``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: Debian installs pgbouncer in /usr/sbin, which a user's PATH may lack.
_SEARCH_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def as_postgres() -> list[str]:
    """The command prefix that drops root: PostgreSQL's programs and pgbouncer refuse it."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def missing() -> str | None:
    """Why a PgBouncer cannot be started here, or None."""
    if shutil.which("pgbouncer", path=_SEARCH_PATH) is None:
        return "pgbouncer not found (Debian package pgbouncer)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (pgbouncer refuses root)"
    return None


def version() -> str:
    """``PgBouncer 1.18.0``, or why it is unknown."""
    binary = shutil.which("pgbouncer", path=_SEARCH_PATH)
    if binary is None:
        return "not installed"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout.splitlines() or ["unknown"])[0]


class PgBouncer:
    """PgBouncer in ``pool_mode = transaction`` in front of ``database`` at ``host:port``.

    ``pool_size`` is ``default_pool_size``: the server connections it opens per database
    and user. ``settings`` are more ``[pgbouncer]`` lines, e.g.
    ``{"server_reset_query_always": "1"}``.
    """

    def __init__(
        self,
        port: int,
        database: str,
        *,
        host: str = "127.0.0.1",
        user: str = "root",
        pool_size: int = 4,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.database = database
        self.user = user
        self.pool_size = pool_size
        self.root = Path(tempfile.mkdtemp(prefix="ast-pgbouncer-"))
        self.port = free_port()
        config = self.root / "pgbouncer.ini"
        # With auth_type = trust the user must still be listed in auth_file.
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        config.write_text(
            "[databases]\n"
            f"{database} = host={host} port={port} dbname={database} user={user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            f"admin_users = {user}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.root / 'pgbouncer.log'}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            + "".join(f"{name} = {value}\n" for name, value in (settings or {}).items())
        )
        if as_postgres():
            shutil.chown(self.root, "postgres")
        self.start()

    def start(self) -> None:
        """Start it on its port; raises RuntimeError (with its log) if it does not listen."""
        binary = shutil.which("pgbouncer", path=_SEARCH_PATH) or "pgbouncer"
        self.process = subprocess.Popen(
            [*as_postgres(), binary, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not reachable(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log
                self.destroy()
                raise RuntimeError(f"pgbouncer on port {self.port} did not start: {log}")
            time.sleep(0.05)  # polling the port of a process that is starting

    @property
    def url(self) -> str:
        """The URL a worker uses (asyncpg), through PgBouncer."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop it (SIGTERM): every client connection to it is closed."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()
