"""The app the fault tests run in real workers, against private PostgreSQL and Redis.

Configured from the environment in workers; the test process points it at its private
servers (``tests/faults/conftest.py``) before it is first used.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Integer, String, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import (
    AsyncSessionTask,
    current_session,
    outbox_table,
    pgbouncer_engine_options,
)


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(String(200))


# Durable publishes (tests/faults/test_outbox.py) write to it.
outbox_table(Base.metadata)

_broker = os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0")
_engine_options = json.loads(os.environ.get("AST_ENGINE_OPTIONS", "{}"))
if os.environ.get("AST_PGBOUNCER") == "1":  # through PgBouncer in transaction pooling mode
    _engine_options = pgbouncer_engine_options(**_engine_options)
app = Celery("fault_app", broker=_broker, backend=os.environ.get("AST_RESULT_BACKEND", _broker))
app.conf.update(
    async_session_url=os.environ.get("AST_DATABASE_URL"),
    async_session_engine_options=_engine_options,
    async_session_stall_threshold=float(os.environ.get("AST_STALL_THRESHOLD", "1.0")),
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


async def count(key: str) -> int:
    total = await current_session().scalar(
        select(func.count()).select_from(Entry).where(Entry.key == key)
    )
    return int(total or 0)


@app.task(bind=True, base=AsyncSessionTask, shared=False)
async def where(self: AsyncSessionTask) -> dict[str, int]:
    """The worker process and PostgreSQL backend that served this run."""
    backend = await self.session.scalar(text("select pg_backend_pid()"))
    return {"pid": os.getpid(), "backend_pid": int(backend or 0)}


@app.task(bind=True, base=AsyncSessionTask, shared=False)
async def hold(self: AsyncSessionTask, key: str, seconds: float) -> int:
    """Writes an entry, then holds its transaction open in a statement for ``seconds``."""
    self.session.add(Entry(key=key, text="held"))
    await self.session.flush()
    await self.session.execute(text("select pg_sleep(:s)"), {"s": seconds})
    await self.session.commit()
    return await count(key)


@app.task(
    bind=True,
    base=AsyncSessionTask,
    shared=False,
    # Connection errors: SQLAlchemy's DBAPIError, or the driver's OSError while connecting.
    autoretry_for=(DBAPIError, OSError),
    max_retries=100,
    default_retry_delay=0.2,
)
async def persistent(self: AsyncSessionTask, key: str) -> int:
    """Writes and commits an entry; retried while the database is away."""
    self.session.add(Entry(key=key, text=f"try:{self.request.retries}"))
    await self.session.commit()
    return int(self.request.retries)


@app.task(
    bind=True, base=AsyncSessionTask, shared=False, acks_late=True, reject_on_worker_lost=True
)
async def half_done(self: AsyncSessionTask, key: str, marker: str) -> dict[str, Any]:
    """First delivery: writes an entry, tells the test (``marker``), waits to be killed.

    Redelivery: writes and commits its entry.
    """
    first = not Path(marker).exists()  # noqa: ASYNC240  # a local file, once per run
    self.session.add(Entry(key=key, text="first" if first else "again"))
    await self.session.flush()
    if first:
        Path(marker).write_text(str(os.getpid()))  # noqa: ASYNC240
        await asyncio.sleep(600)  # SIGKILLed here, its transaction open
    await self.session.commit()
    return {"pid": os.getpid(), "entries": await count(key)}


@app.task(bind=True, base=AsyncSessionTask, shared=False)
async def stall(self: AsyncSessionTask, seconds: float) -> int:
    """Blocks the event loop: a sync sleep inside an async body."""
    time.sleep(seconds)  # noqa: ASYNC251  # the mistake under test
    return os.getpid()


@app.task(bind=True, base=AsyncSessionTask, shared=False, autocommit=True)
async def record(self: AsyncSessionTask, key: str) -> None:
    """Writes its task id under ``key``: the tests count runs per task id."""
    self.session.add(Entry(key=key, text=self.request.id))
