"""The naive async pattern: ``asyncio.run()`` per task, with a new engine per task.

A pooled engine cannot be shared across the loops that ``asyncio.run`` creates (asyncpg
connections belong to one loop), so each task connects and disposes its own engine.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from benchmarks._apps import TASK_NAME, database_url, make_app
from benchmarks._model import Counter

app = make_app("bench_naive")
URL = database_url("asyncpg")


async def _work(row_id: int, wait: float) -> int:
    if wait:
        await asyncio.sleep(wait)
    engine = create_async_engine(URL)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            counter = await session.get(Counter, row_id)
            assert counter is not None, row_id
            counter.value += 1
            await session.commit()
            return counter.value
    finally:
        await engine.dispose()


@app.task(name=TASK_NAME)
def work(row_id: int, wait: float) -> int:
    return asyncio.run(_work(row_id, wait))
