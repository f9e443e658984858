"""Clients made once per worker process and shared by its runs: an HTTP client and a Redis
client, on the process's event loop.

``async_session_lifespan`` is an async context manager factory, as FastAPI's ``lifespan``:
it is entered on the loop before the first run of the process uses it, what it yields is
``lifespan_state()`` (or ``self.lifespan_state``) in every run, and it is exited on the loop
when the worker process stops, before the database engines are disposed. Overlapping runs
(``-P threads``, ``-P gevent``) use the same clients at once, over their connection pools.

``EXAMPLES_HTTP_URL`` is the service the task fetches from; ``EXAMPLES_REDIS_URL`` (default:
the local Redis) caches what it fetched.

    celery -A examples.lifespan worker -P threads -c 8
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio
from celery import Celery
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask, lifespan_state
from examples import settings


@contextlib.asynccontextmanager
async def lifespan(app: Celery) -> AsyncIterator[dict[str, Any]]:
    """Entered once per worker process, on its loop; exited there at shutdown."""
    async with httpx.AsyncClient(
        base_url=os.environ.get("EXAMPLES_HTTP_URL", "http://127.0.0.1:8000"), timeout=10
    ) as http:
        cache = redis.asyncio.Redis.from_url(
            os.environ.get("EXAMPLES_REDIS_URL", "redis://127.0.0.1:6379/0")
        )
        try:
            yield {"http": http, "cache": cache}
        finally:
            await cache.aclose()


app = Celery("examples.lifespan")
app.conf.update(
    settings.celery_settings(),
    async_session_url=settings.DATABASE_URL,
    async_session_lifespan=lifespan,  # or the import string "examples.lifespan:lifespan"
)


class Base(DeclarativeBase):
    pass


class Page(Base):
    __tablename__ = "lifespan_pages"
    path: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[int]


async def fetch(path: str) -> int:
    """A helper of your own code: it reaches the clients through ``lifespan_state()``."""
    state = lifespan_state()
    cached = await state["cache"].get(f"examples-lifespan:{path}")
    if cached is not None:
        return int(cached)
    response: httpx.Response = await state["http"].get(path)
    await state["cache"].set(f"examples-lifespan:{path}", response.status_code, ex=60)
    return response.status_code


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def record_page(self: AsyncSessionTask, path: str) -> dict[str, Any]:
    """Fetch ``path`` (through the shared clients) and record its status."""
    status = await fetch(path)
    await self.session.merge(Page(path=path, status=status))
    return {"path": path, "status": status, "http_client": id(self.lifespan_state["http"])}
