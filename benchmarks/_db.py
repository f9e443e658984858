"""The bench database: created for a run, dropped after it (psycopg, autocommit)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg
from sqlalchemy import MetaData, create_engine

from async_session_task import outbox_table, runs_table

#: A URL of the server's maintenance database; the bench database is made beside it.
ADMIN_URL = os.environ.get("AST_BENCH_ADMIN_URL", "postgresql://root@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def bench_database(rows: int, first_rows: list[int]) -> Iterator[str]:
    """A fresh database with ``rows`` counters from each of ``first_rows``; yields its URL.

    Named after this process, so a run never drops another run's (or a test's) database.
    """
    name = f"ast_bench_{os.getpid()}"
    url = f"{ADMIN_URL.rpartition('/')[0]}/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE bench_counter (id integer PRIMARY KEY, value integer NOT NULL)"
            )
            for first in first_rows:
                conn.execute(
                    "INSERT INTO bench_counter SELECT generate_series(%s::int, %s::int), 0",
                    (first, first + rows - 1),
                )
        # The tables of idempotent runs and durable publishes, as users migrate them.
        metadata = MetaData()
        runs_table(metadata)
        outbox_table(metadata)
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        metadata.create_all(engine)
        engine.dispose()
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def reset_counters(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE bench_counter SET value = 0")


def counter_sum(url: str, first_row: int) -> int:
    """The sum of the counters of the implementation whose rows start at ``first_row``."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(value), 0) FROM bench_counter WHERE id >= %s AND id < %s",
            (first_row, first_row + 1_000_000),
        ).fetchone()
    return int(row[0]) if row else 0


def server_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"
