"""The implementations a workload runs side by side: each a worker module and its settings.

Variants of one module differ only by environment variables, read by the module at import
(``impl_library``: driver, engine options, event loop, body, PgBouncer; ``_apps``: result
storage).
Each implementation has a range of counter rows of its own, so the counters prove that every
success incremented one row once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Implementation:
    name: str
    label: str  #: as shown in the tables
    module: str
    first_row: int | None  #: first counter row; None: it touches no row
    env: dict[str, str] = field(default_factory=dict)
    log_level: str = "WARNING"
    store_results: bool = True
    #: Pools it runs on; empty: every pool.
    pools: tuple[str, ...] = ()
    #: It connects through the run's private PgBouncer (``benchmarks/_pgbouncer.py``).
    pgbouncer: bool = False

    def runs_on(self, pool: str) -> bool:
        return not self.pools or pool in self.pools


def _library(name: str, label: str, index: int, **settings: Any) -> Implementation:
    pgbouncer = bool(settings.pop("pgbouncer", False))
    # uvloop has no place in a gevent worker, which keeps gevent's loop.
    uvloop = settings.get("loop") == "uvloop"
    pools = settings.pop("pools", ("prefork", "threads") if uvloop else ())
    env = {f"AST_BENCH_{key.upper()}": value for key, value in settings.items() if key != "opts"}
    if "opts" in settings:
        env["AST_BENCH_ENGINE_OPTIONS"] = json.dumps(settings["opts"])
    return Implementation(
        name,
        label,
        "benchmarks.impl_library",
        1_000_000 * index,
        env,
        pools=pools,
        pgbouncer=pgbouncer,
    )


#: asyncpg's statement cache and SQLAlchemy's cache of its prepared statements, both off
#: (what PgBouncer's transaction mode needs, docs/deployment.md).
ASYNCPG_NO_CACHE = {"connect_args": {"statement_cache_size": 0, "prepared_statement_cache_size": 0}}
#: psycopg 3 prepares a statement server-side after 5 executions; None: never.
PSYCOPG_NO_CACHE = {"connect_args": {"prepare_threshold": None}}

_ALL = [
    # The defaults as a user gets them: pool_pre_ping=True is one of them.
    _library("library", "async_session_task, defaults", 1),
    _library(
        "library-nopreping",
        "async_session_task, pool_pre_ping=False",
        2,
        opts={"pool_pre_ping": False},
    ),
    _library("library-uvloop", "async_session_task + uvloop", 3, loop="uvloop"),
    _library("library-psycopg", "async_session_task on psycopg 3 async", 4, driver="psycopg"),
    _library(
        "library-runsync", "async_session_task, one session.run_sync() block", 5, body="run_sync"
    ),
    _library(
        "library-nocache",
        "async_session_task, asyncpg statement caches off",
        6,
        opts=ASYNCPG_NO_CACHE,
    ),
    _library(
        "library-psycopg-nocache",
        "async_session_task on psycopg 3 async, prepare off",
        7,
        driver="psycopg",
        opts=PSYCOPG_NO_CACHE,
    ),
    _library(
        "library-tuned",
        "async_session_task tuned: uvloop, run_sync(), no pre-ping",
        8,
        loop="uvloop",
        body="run_sync",
        opts={"pool_pre_ping": False},
    ),
    # Through PgBouncer (transaction pooling) with async_session_task.pgbouncer_engine_options();
    # on prefork and threads: what a worker pays for the pooler.
    _library(
        "library-pgbouncer",
        "async_session_task through PgBouncer, pgbouncer_engine_options()",
        9,
        pgbouncer=True,
        pools=("prefork", "threads"),
    ),
    # The other candidate for PgBouncer: psycopg 3, which never prepares with this setting.
    _library(
        "library-pgbouncer-psycopg",
        "async_session_task through PgBouncer, psycopg 3 async, prepare off",
        13,  # 11 and 12 are library-info's and library-noresult's
        pgbouncer=True,
        pools=("prefork", "threads"),
        driver="psycopg",
        opts=PSYCOPG_NO_CACHE,
    ),
    # SQLAlchemy's own pool sizes, where the library's default is 15 + 0: the same most
    # connections, but an overflow connection is closed as it is returned.
    _library(
        "library-sapool",
        "async_session_task, SQLAlchemy's pool_size=5, max_overflow=10",
        14,
        opts={"pool_size": 5, "max_overflow": 10},
    ),
    # The pre-ping's round trip on every pooled checkout, where the library checks a
    # connection returned less than a second ago without one (docs/internals.md).
    _library(
        "library-ping",
        "async_session_task, SELECT 1 on every pooled checkout",
        15,
        ping="always",
    ),
    _library(
        "library-pgbouncer-ping",
        "async_session_task through PgBouncer, SELECT 1 on every pooled checkout",
        16,
        ping="always",
        pgbouncer=True,
        pools=("prefork", "threads"),
    ),
    # Each run writes its marker in its own transaction (docs/running-once.md).
    _library("library-idempotent", "async_session_task, idempotent=True", 10, idempotent="1"),
    Implementation("sync", "sync pattern (psycopg 3)", "benchmarks.impl_sync", 20_000_000),
    Implementation("naive", "naive asyncio.run", "benchmarks.impl_naive", 21_000_000),
    Implementation("noop", "no-op (Celery alone)", "benchmarks.impl_noop", None),
]
# What two harnesses may count differently: the log level, storing results (--long).
_ALL += [
    Implementation(
        f"{base.name}-info",
        f"{base.label}, -l INFO",
        base.module,
        base.first_row + 10_000_000,
        log_level="INFO",
    )
    for base in _ALL
    if base.name in ("library", "sync") and base.first_row is not None
]
_ALL += [
    Implementation(
        f"{base.name}-noresult",
        f"{base.label}, results not stored",
        base.module,
        base.first_row + 11_000_000,
        store_results=False,
    )
    for base in _ALL
    if base.name in ("library", "sync") and base.first_row is not None
]

IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in _ALL}
#: What every ratio is taken against.
BASELINES = ("sync", "naive")
#: Suffixes of variants whose worker settings differ; their ratios are to the baseline with
#: the same suffix, when it ran.
FACTORS = ("-info", "-noresult")

#: What ``nox -s bench`` runs per workload; ``--long`` runs every implementation on the DB
#: workload (the statement caches off, the log level and result storage too).
DEFAULTS: dict[str, tuple[str, ...]] = {
    "db-prefork": (
        "library",
        "library-ping",
        "library-uvloop",
        "library-psycopg",
        "library-runsync",
        "library-tuned",
        "library-pgbouncer",
        "sync",
        "naive",
        "noop",
    ),
    "io-threads": ("library", "library-ping", "library-uvloop", "sync", "naive", "noop"),
    "io-gevent": ("library", "sync", "naive", "noop"),
    "db-threads": ("library", "library-pgbouncer", "sync"),
}
