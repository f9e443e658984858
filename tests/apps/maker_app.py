"""An app that brings its own ``async_sessionmaker``, as a FastAPI project would.

With ``AST_WARM_PARENT=1`` the engine connects at import time, so in a prefork worker the
parent process holds a pooled connection that every forked child inherits
(docs/internals.md#fork).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from async_session_task import AsyncSessionTask

engine = create_async_engine(
    os.environ.get("AST_DATABASE_URL", "postgresql+asyncpg://root@127.0.0.1/test"),
    **json.loads(os.environ.get("AST_ENGINE_OPTIONS", "{}")),
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def _warm() -> None:
    async with SessionLocal() as session:
        await session.execute(text("select 1"))


if os.environ.get("AST_WARM_PARENT") == "1":
    asyncio.run(_warm())

app = Celery(
    "maker_app",
    broker=os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("AST_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    async_session_maker="tests.apps.maker_app:SessionLocal",
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True, base=AsyncSessionTask)
async def backend_pid(self: AsyncSessionTask) -> dict[str, Any]:
    pid = await self.session.scalar(text("select pg_backend_pid()"))
    return {"pid": os.getpid(), "backend_pid": pid}
