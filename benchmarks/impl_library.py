"""This library: an ``AsyncSessionTask`` body on the process's loop, a session per run.

Its variants (``benchmarks._variants``) are set by environment variables, read at import:
``AST_BENCH_DRIVER`` (``asyncpg``, ``psycopg``), ``AST_BENCH_ENGINE_OPTIONS`` (JSON, given as
``async_session_engine_options``), ``AST_BENCH_LOOP`` (``uvloop``) and ``AST_BENCH_BODY``
(``run_sync``: the ORM work as one sync block).
"""

from __future__ import annotations

import asyncio
import json
import os

from sqlalchemy.orm import Session

from async_session_task import AsyncSessionTask
from benchmarks._apps import TASK_NAME, database_url, make_app
from benchmarks._model import Counter

if os.environ.get("AST_BENCH_LOOP") == "uvloop":
    import uvloop

    # Before the library makes its loop: asyncio.new_event_loop() asks the policy.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

app = make_app("bench_library")
app.conf.async_session_url = database_url(os.environ.get("AST_BENCH_DRIVER", "asyncpg"))
if options := os.environ.get("AST_BENCH_ENGINE_OPTIONS"):
    app.conf.async_session_engine_options = json.loads(options)
RUN_SYNC = os.environ.get("AST_BENCH_BODY") == "run_sync"


def change(session: Session, row_id: int) -> int:
    """Get, change, commit: the same ORM work, as one block of sync code."""
    counter = session.get(Counter, row_id)
    assert counter is not None, row_id
    counter.value += 1
    session.commit()
    return counter.value


@app.task(name=TASK_NAME, bind=True, base=AsyncSessionTask)
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
