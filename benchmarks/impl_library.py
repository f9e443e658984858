"""This library: an ``AsyncSessionTask`` body on the process's loop, a session per run."""

from __future__ import annotations

import asyncio

from async_session_task import AsyncSessionTask
from benchmarks._apps import TASK_NAME, database_url, make_app
from benchmarks._model import Counter

app = make_app("bench_library")
app.conf.async_session_url = database_url("asyncpg")


@app.task(name=TASK_NAME, bind=True, base=AsyncSessionTask)
async def work(self: AsyncSessionTask, row_id: int, wait: float) -> int:
    if wait:
        await asyncio.sleep(wait)  # the outside I/O of the IO-bound workload
    counter = await self.session.get(Counter, row_id)
    assert counter is not None, row_id
    counter.value += 1
    await self.session.commit()
    return counter.value
