"""A soft time limit on an ``async def`` body (prefork pool).

When the soft limit expires, the body is cancelled at the ``await`` it is waiting on: its
``finally`` blocks run, the session rolls back what was not committed and goes back to the
pool, and the task fails with ``SoftTimeLimitExceeded``. Work committed before stays, so a
long job that commits in batches can be resumed.

A statement the server is still running when its connection is dropped keeps running there:
set ``statement_timeout`` (PostgreSQL) below the time limit, as here.

    celery -A examples.time_limits worker -P prefork
"""

from __future__ import annotations

import asyncio

from celery import Celery
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask
from examples import settings

app = Celery("examples.time_limits")
app.conf.update(settings.celery_settings(), async_session_url=settings.DATABASE_URL)
if settings.DATABASE_URL.startswith("postgresql"):
    app.conf.async_session_engine_options = {
        "connect_args": {"server_settings": {"statement_timeout": "5000"}}
    }


class Base(DeclarativeBase):
    pass


class ImportedRow(Base):
    __tablename__ = "time_limits_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(40), index=True)
    batch: Mapped[int] = mapped_column(Integer)


BATCH = 10


@app.task(bind=True, base=AsyncSessionTask, soft_time_limit=1, time_limit=30)
async def import_rows(self: AsyncSessionTask, job: str, batches: int, pause: float) -> int:
    """Import ``batches`` batches, committing each; ``pause`` stands in for a slow source."""
    for batch in range(batches):
        self.session.add_all(ImportedRow(job=job, batch=batch) for _ in range(BATCH))
        await self.session.flush()
        await asyncio.sleep(pause)  # fetching the next page from a slow API, say
        await self.session.commit()
    return batches * BATCH
