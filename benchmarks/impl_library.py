"""This library: an ``AsyncSessionTask`` body on the process's loop, a session per run.

Its variants (``benchmarks._variants``) are set by environment variables, read at import:
``AST_BENCH_DRIVER`` (``asyncpg``, ``psycopg``), ``AST_BENCH_ENGINE_OPTIONS`` (JSON, given as
``async_session_engine_options``), ``AST_BENCH_LOOP`` (``uvloop``), ``AST_BENCH_BODY``
(``run_sync``: the ORM work as one sync block), ``AST_BENCH_PGBOUNCER`` (a PgBouncer's
asyncpg URL: connect through it with ``pgbouncer_engine_options()``, or with psycopg and
the options given when the driver is ``psycopg``) and
``AST_BENCH_IDEMPOTENT`` (``1``: ``idempotent=True``, a marker per run) and ``AST_BENCH_PING``
(``always``: the pre-ping's ``SELECT 1`` on every pooled checkout, its window set to 0, to
measure what the check without a round trip saves).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping

from celery import Celery
from sqlalchemy.orm import Session

from async_session_task import AsyncSessionTask, _ping, pgbouncer_engine_options
from benchmarks._apps import TASK_NAME, database_url, make_app
from benchmarks._model import Counter

if os.environ.get("AST_BENCH_LOOP") == "uvloop":
    import uvloop

    # Before the library makes its loop: asyncio.new_event_loop() asks the policy.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def configure(app: Celery, environ: Mapping[str, str]) -> None:
    """Set the app's session settings as the variant's environment says; nothing else, so a
    variant without options runs with the library's defaults."""
    options = json.loads(environ.get("AST_BENCH_ENGINE_OPTIONS") or "{}")
    if bouncer := environ.get("AST_BENCH_PGBOUNCER"):
        if environ.get("AST_BENCH_DRIVER") == "psycopg":  # the candidate: its options as given
            app.conf.async_session_url = bouncer.replace("+asyncpg", "+psycopg", 1)
            app.conf.async_session_engine_options = options
            return
        app.conf.async_session_url = bouncer
        app.conf.async_session_engine_options = pgbouncer_engine_options(**options)
        return
    app.conf.async_session_url = database_url(environ.get("AST_BENCH_DRIVER", "asyncpg"))
    if options:
        app.conf.async_session_engine_options = options


if os.environ.get("AST_BENCH_PING") == "always":
    _ping.IDLE_PING_AFTER = 0.0

app = make_app("bench_library")
configure(app, os.environ)
RUN_SYNC = os.environ.get("AST_BENCH_BODY") == "run_sync"
IDEMPOTENT = os.environ.get("AST_BENCH_IDEMPOTENT") == "1"


def change(session: Session, row_id: int) -> int:
    """Get, change, commit: the same ORM work, as one block of sync code."""
    counter = session.get(Counter, row_id)
    assert counter is not None, row_id
    counter.value += 1
    session.commit()
    return counter.value


@app.task(name=TASK_NAME, bind=True, base=AsyncSessionTask, idempotent=IDEMPOTENT)
async def work(self: AsyncSessionTask, row_id: int, wait: float) -> int:
    if wait:
        await asyncio.sleep(wait)  # the outside I/O of the IO-bound workload
    if RUN_SYNC:
        return await self.session.run_sync(change, row_id)
    counter = await self.session.get(Counter, row_id)
    assert counter is not None, row_id
    counter.value += 1
    await self.session.commit()
    return counter.value
