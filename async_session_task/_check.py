"""``celery -A proj async-session check``: what a worker of this app would meet, before it does.

The command itself is in ``_cli``. Sessions are resolved by the same code as a
task's first run (:func:`_factory.session_factory`); the probes (``_probe``) run on a
private event loop (``asyncio.run``: a command, not a worker) that disposes every engine it
connected; each ``*_rows`` function then reads only what it is given. No line shows a
password (docs/check.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import ImproperlyConfigured
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from . import _config, _factory, _ping, _pools
from ._probe import Target, probe
from ._tables import OUTBOX, RUNS
from ._task import async_session_tasks

OK, WARN, ERROR, SKIP = "OK", "WARN", "ERROR", "SKIP"
#: The statement-cache options that transaction pooling needs (docs/check.md#pgbouncer).
_CACHE_OFF = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}


@dataclass
class Row:
    status: str
    check: str
    detail: str


def resolve_targets(app: Any) -> tuple[list[Row], list[Target]]:
    """Every AsyncSessionTask's session factory, by the first run's code; their engines."""
    rows: list[Row] = []
    targets: dict[int, Target] = {}
    engines: dict[_config.EngineKey, AsyncEngine] = {}
    tasks = async_session_tasks(app)
    for task in tasks:
        settings = _config.Settings.of(task)
        try:
            maker = _factory.session_factory(settings, engines)
        except ImproperlyConfigured as exc:
            rows.append(Row(ERROR, f"task {task.name}", str(exc)))
            continue
        for engine in _factory.engines_of(maker):
            targets.setdefault(id(engine), Target(engine, settings)).tasks.append(task)
    if not tasks:
        rows.append(Row(WARN, "session factories", "no AsyncSessionTask in this app"))
    else:
        failed = len(rows)
        status = ERROR if failed else OK
        detail = f"{len(tasks) - failed} of {len(tasks)} tasks resolve, {len(targets)} engine(s)"
        rows.insert(0, Row(status, "session factories", detail))
    return rows, list(targets.values())


async def probe_all(app: Any, targets: list[Target], cleanup: bool = False) -> Row:
    """Probe every engine (deleting old run markers if ``cleanup``), then enter and exit the
    lifespan; the row of the lifespan."""
    retention = _config.runs_retention(app.conf)
    for target in targets:
        await probe(target, retention, cleanup)
    lifespans: dict[int, Callable[[Any], Any]] = {}
    for task in async_session_tasks(app):
        try:
            found = _config.lifespan_of(task)
        except ImproperlyConfigured as exc:
            return Row(ERROR, "lifespan", str(exc))
        if found is not None:
            lifespans[id(found)] = found
    if not lifespans:
        return Row(SKIP, "lifespan", "not configured")
    started = time.perf_counter()
    for lifespan in lifespans.values():
        try:
            async with asyncio.timeout(30), lifespan(app):
                pass
        except Exception as exc:
            name = f"{lifespan.__module__}:{lifespan.__qualname__}"
            return Row(ERROR, "lifespan", f"{name} failed: {type(exc).__name__}: {exc}")
    return Row(OK, "lifespan", f"entered and exited in {time.perf_counter() - started:.2f} s")


def pool_sizing(engine: AsyncEngine, runs: int) -> tuple[int, str]:
    """The connections one process's pool of ``engine`` gives ``runs`` runs at once, and
    what sets that number."""
    pool = engine.sync_engine.pool
    limit = _factory.pool_limit(pool)
    if limit is None:
        return runs, f"{type(pool).__name__}: a connection per run"
    size = pool.size()  # type: ignore[attr-defined]  # a QueuePool, as pool_limit says
    return limit, f"pool_size {size} + max_overflow {limit - size}"


def target_rows(target: Target, runs: int) -> list[Row]:
    """The rows of one engine whose worker processes run ``runs`` runs at once, from what
    its probe found."""
    engine, facts = target.engine, target.facts
    url = engine.url.render_as_string(hide_password=True)
    names = ", ".join(t.name for t in target.tasks[:3]) + (", ..." if len(target.tasks) > 3 else "")
    if target.error:
        return [Row(ERROR, "database", f"cannot connect to {url} ({names}): {target.error}")]
    is_pg = engine.dialect.name == "postgresql"
    server = f"{'PostgreSQL ' if is_pg else ''}{facts.version}, driver {engine.dialect.driver}"
    detail = f"{url}: connected in {target.connect_ms:.0f} ms, {server}"
    rows = [Row(OK, "database", f"{detail}; {len(target.tasks)} task(s): {names}")]
    capacity, sizing = pool_sizing(engine, runs)
    if capacity < runs:
        detail = f"{sizing} < {runs} runs at once per process: runs wait for a connection"
        rows.append(Row(WARN, "pool", f"{detail}; raise pool_size + max_overflow"))
    else:
        rows.append(Row(OK, "pool", f"{sizing} for {runs} run(s) at once per process"))
    rows.append(bouncer_row(target))
    sync_pool = engine.sync_engine.pool
    if _ping.installed(engine):
        rows.append(Row(OK, "pool_pre_ping", "on (socket check; SELECT 1 after 1 s idle)"))
    elif getattr(sync_pool, "_pre_ping", False):  # Pool keeps it private
        rows.append(Row(OK, "pool_pre_ping", "on"))
    elif isinstance(sync_pool, NullPool):
        rows.append(Row(OK, "pool_pre_ping", "NullPool: every run connects"))
    else:
        detail = "off: after a database restart each pooled connection fails one run"
        rows.append(Row(WARN, "pool_pre_ping", f"{detail}; set pool_pre_ping=True"))
    if is_pg:
        rows.append(timeout_row(target))
    if target.runs is not None:
        rows.append(runs_row(target))
    if target.outbox is not None:
        rows.append(outbox_row(target))
    return rows


def outbox_row(target: Target) -> Row:
    """The outbox of durable publishes: an error if the app makes calls durable (or runs
    the relay) and the table is unusable; its backlog and dead letters."""
    facts = target.outbox
    assert facts is not None
    if facts.problem:
        conf = target.tasks[0].app.conf if target.tasks else {}
        used = conf.get(_config.OUTBOX) or conf.get(_config.OUTBOX_RELAY)
        status = ERROR if used else SKIP
        return Row(status, "outbox", f"{OUTBOX} {facts.problem} (docs/outbox.md)")
    detail = f"{OUTBOX}: {facts.pending} pending"
    if facts.pending:
        detail += f", the oldest for {facts.oldest_seconds:.0f} s"
    status = OK
    if facts.dead:
        status = WARN
        detail += f"; {facts.dead} dead letter(s): see docs/outbox.md#dead-letters"
    return Row(status, "outbox", detail)


def runs_row(target: Target) -> Row:
    """The table of run markers that the target's idempotent tasks write to."""
    facts = target.runs
    assert facts is not None
    if facts.problem:
        return Row(ERROR, "runs table", f"{RUNS} {facts.problem} (docs/running-once.md)")
    size = "" if facts.size_bytes is None else f", {facts.size_bytes // 1024} kB"
    detail = f"{RUNS}: {facts.rows} marker(s){size}"
    if target.cleaned is not None:
        return Row(OK, "runs table", f"{detail}; deleted {target.cleaned} older than retention")
    if facts.expired:
        detail += f"; {facts.expired} older than retention: run check --cleanup or cleanup_runs()"
    return Row(OK, "runs table", detail)


def budget_rows(targets: list[Target], processes: int, runs: int) -> list[Row]:
    """Connections ``processes`` worker processes of ``runs`` runs at once may hold on each
    server, against what it has free. A server is the one the probes reached, however the
    URLs spell it."""
    servers: dict[tuple[Any, bool], list[Target]] = {}
    for target in targets:
        if target.engine.dialect.name == "postgresql" and not target.error:
            server = (target.facts.server, bool(target.bouncer))
            servers.setdefault(server, []).append(target)
    rows = []
    for (_, bouncer), group in servers.items():
        capacities = [pool_sizing(t.engine, runs)[0] for t in group]
        needed = sum(processes * min(capacity, runs) for capacity in capacities)
        ceiling = sum(processes * capacity for capacity in capacities)
        if bouncer:
            detail = f"{needed} client connections through PgBouncer, which sizes the server's"
            rows.append(Row(OK, "connection budget", f"{detail} share"))
            continue
        # The fullest the server was while the probes ran.
        facts = max((t.facts for t in group), key=lambda facts: facts.in_use)
        free = facts.max_connections - facts.reserved - facts.in_use
        terms = " + ".join(str(min(capacity, runs)) for capacity in capacities)
        urls = dict.fromkeys(f"{t.engine.url.host}:{t.engine.url.port or 5432}" for t in group)
        detail = (
            f"{', '.join(urls)}{' (one server)' if len(urls) > 1 else ''}: {processes} "
            f"process(es) x {terms if len(group) == 1 else f'({terms})'} = {needed}"
            + (f" (the pools could open {ceiling})" if ceiling > needed else "")
            + f" {'>' if needed > free else '<='} {free} free (max_connections "
            f"{facts.max_connections} - {facts.reserved} reserved - {facts.in_use} in use)"
        )
        rows.append(Row(ERROR if needed > free else OK, "connection budget", detail))
    return rows


def bouncer_row(target: Target) -> Row:
    """PgBouncer in front of the server, and whether the statement cache suits it."""
    driver = target.engine.dialect.driver
    if driver != "asyncpg":
        return Row(SKIP, "pgbouncer", f"not probed with driver {driver}")
    if target.bouncer == "":
        return Row(OK, "pgbouncer", f"none (the server answered: {target.bouncer_answer})")
    if target.bouncer is None:
        return Row(WARN, "pgbouncer", f"unknown (admin console: {target.bouncer_answer})")
    found = f"PgBouncer {target.bouncer}"
    if target.settings.maker is not None:
        detail = "the statement-cache options of your own engine cannot be read: docs/check.md"
        return Row(WARN, "pgbouncer", f"{found}; {detail}")
    options = target.settings.engine_options.get("connect_args", {})
    args = {**target.engine.url.query, **options}
    missing = [name for name, off in _CACHE_OFF.items() if int(args.get(name, 100)) != off]
    missing += [] if "prepared_statement_name_func" in args else ["prepared_statement_name_func"]
    if not missing:
        return Row(OK, "pgbouncer", f"{found}; statement cache off")
    return Row(ERROR, "pgbouncer", (
        f"{found} detected, statement cache not disabled ({', '.join(missing)} not set): "
        "prepared statements fail in transaction pooling; use pgbouncer_engine_options()"
    ))  # fmt: skip


def timeout_row(target: Target) -> Row:
    """The server's statement_timeout against the smallest time limit of the tasks."""
    statement_timeout_ms = target.facts.statement_timeout_ms
    limits = {}
    for task in target.tasks:
        if given := [limit for limit in _config.task_time_limits(task) if limit]:
            limits[task.name] = min(given)
    if not limits:
        return Row(OK, "statement_timeout", f"{statement_timeout_ms} ms; no task time limits")
    name, limit = min(limits.items(), key=lambda item: item[1])
    if statement_timeout_ms and statement_timeout_ms <= limit * 1000:
        return Row(OK, "statement_timeout", f"{statement_timeout_ms} ms <= {limit} s ({name})")
    setting = f"{statement_timeout_ms} ms" if statement_timeout_ms else "off"
    detail = "a stopped run's statement keeps running on the server; set it below the limit"
    return Row(WARN, "statement_timeout", f"{setting}, {name} has a limit of {limit} s: {detail}")


def run_check(
    app: Any, pool: str | None = None, concurrency: int | None = None, cleanup: bool = False
) -> list[Row]:
    """The rows of the check of ``app`` for ``-P pool -c concurrency`` (defaults: app.conf);
    with ``cleanup``, run markers older than the retention are deleted first."""
    app.loader.import_default_modules()
    pool = _pools.pool_name(pool or app.conf.worker_pool)
    concurrency = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
    processes, runs = _pools.processes_and_runs(pool, concurrency)
    rows, targets = resolve_targets(app)
    lifespan = asyncio.run(probe_all(app, targets, cleanup))
    for target in targets:
        rows += target_rows(target, runs)
    rows += [*budget_rows(targets, processes, runs), lifespan]
    # URLs are rendered with hide_password=True; a driver's message might still quote one.
    for password in {str(t.engine.url.password) for t in targets if t.engine.url.password}:
        for row in rows:
            row.detail = row.detail.replace(password, "***")
    return [Row(OK, "worker", f"{app.main or app}: -P {pool} -c {concurrency}"), *rows]
