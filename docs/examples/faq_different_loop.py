"""The mistake behind "attached to a different loop": one pooled engine, a new loop per task.

The first call leaves a pooled asyncpg connection bound to a loop that ``asyncio.run()``
then closes; the next call, on a new loop, gets that connection from the pool.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("postgresql+asyncpg://app@127.0.0.1/shop")


async def ping() -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(text("select 1")))


def task_body() -> int:  # what a sync @app.task calling asyncio.run() does on each run
    return asyncio.run(ping())
