"""What the check command learns by asking: each engine's server, and a PgBouncer in front.

One :class:`Target` per engine the app's tasks use; :func:`probe` connects once with the
configured driver and records what the server said, then disposes the engine, so the next
probe's count of connections in use excludes this one. ``_check`` judges what was found.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _config
from ._marker import TableFacts, cleanup_runs, table_facts
from ._outbox import OutboxFacts, outbox_facts

#: What PostgreSQL says of itself in one round trip, in the order of :class:`ServerFacts`.
_SERVER_FACTS = text(
    "select current_setting('server_version'), current_setting('max_connections')::int, "
    "current_setting('superuser_reserved_connections')::int, (select count(*) from "
    "pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()), "
    "(select setting::int from pg_settings where name = 'statement_timeout'), "
    "pg_postmaster_start_time(), current_setting('port')::int"
)


class ServerFacts(NamedTuple):
    """What a server said; a database other than PostgreSQL says only its version."""

    version: str
    max_connections: int = 0
    reserved: int = 0  # superuser_reserved_connections
    in_use: int = 0  # client connections open, the probe's own excluded
    statement_timeout_ms: int = 0
    started: datetime.datetime | None = None  # pg_postmaster_start_time()
    port: int = 0  # the port the server listens on, whatever port the URL reached

    @property
    def server(self) -> tuple[Any, ...]:
        """Equal for every URL that reaches this running server, however it spells the host
        and port. Not ``inet_server_addr()``: ``localhost`` may reach it on ``::1``, a Unix
        socket has none. Not the system identifier of ``pg_control_system()``: a physical
        replica shares it, and an operator may revoke ``EXECUTE`` on it from ``PUBLIC``."""
        return self.started, self.port


@dataclass
class Target:
    """One engine the app's tasks use, with what a probe found out about its server."""

    engine: AsyncEngine
    settings: _config.Settings
    tasks: list[Any] = field(default_factory=list)
    error: str = ""
    connect_ms: float = 0.0
    facts: ServerFacts = field(default_factory=lambda: ServerFacts(""))  # before the probe
    bouncer: str | None = None  # PgBouncer's version; "" when the server said none; None: unknown
    bouncer_answer: str = ""
    #: The run markers' table, when a task of this engine is idempotent.
    runs: TableFacts | None = None
    #: Markers the probe deleted (``check --cleanup``); None: it deleted none.
    cleaned: int | None = None
    #: The outbox's backlog and dead letters (PostgreSQL and SQLite).
    outbox: OutboxFacts | None = None


async def probe(
    target: Target,
    retention: datetime.timedelta = _config.DEFAULT_RUNS_RETENTION,
    cleanup: bool = False,
) -> None:
    """Connect with the configured driver; ask the server (and a PgBouncer) about itself,
    and about the run markers' table if a task needs it (first deleting the markers older
    than ``retention`` if ``cleanup``)."""
    engine = target.engine
    started = time.perf_counter()
    try:
        async with engine.connect() as conn:
            target.connect_ms = (time.perf_counter() - started) * 1000
            if engine.dialect.name == "postgresql":
                target.facts = ServerFacts(*(await conn.execute(_SERVER_FACTS)).one())
            else:
                version = ".".join(map(str, engine.dialect.server_version_info or ()))
                target.facts = ServerFacts(version)
            if engine.dialect.name in ("postgresql", "sqlite"):
                target.outbox = await outbox_facts(conn)
                await conn.rollback()
            if any(getattr(task._once, "idempotent", False) for task in target.tasks):
                target.runs = await table_facts(conn, retention)
                await conn.rollback()
                if cleanup and not target.runs.problem:
                    target.cleaned = await cleanup_runs(conn, older_than=retention)
    except Exception as exc:  # any driver's failure to connect is this row's finding
        # The driver's own error, not SQLAlchemy's wrappers of it.
        cause = getattr(exc, "orig", None) or exc
        cause = cause.__cause__ or cause
        target.error = f"{type(cause).__name__}: {str(cause).strip()}".splitlines()[0]
        return
    finally:
        # Closed at once: the next engine's count of connections in use excludes ours.
        await engine.dispose()
    if engine.dialect.driver != "asyncpg":
        return
    url = engine.url
    try:
        # PgBouncer answers for its admin console, "pgbouncer", with its own version as the
        # server_version parameter; PostgreSQL has no such database (docs/check.md#pgbouncer).
        login = {"host": url.host, "port": url.port, "user": url.username}
        console = await asyncpg.connect(
            **login, password=url.password, database="pgbouncer", timeout=10
        )
    except asyncpg.InvalidCatalogNameError as exc:
        target.bouncer, target.bouncer_answer = "", str(exc)
    except asyncpg.PostgresError as exc:
        # An admin console that refuses a user not in admin_users/stats_users.
        target.bouncer = "(version not shown to this user)" if "not allowed" in str(exc) else None
        target.bouncer_answer = str(exc)
    except (TimeoutError, OSError) as exc:
        target.bouncer_answer = f"{type(exc).__name__}: {exc}"
    else:
        version = console.get_settings().server_version
        await console.close()
        target.bouncer = version.removesuffix("/bouncer") if "bouncer" in version else ""
        target.bouncer_answer = f"server_version {version}"
