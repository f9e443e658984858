"""Tasks of the typing tests, on the test app: ``pydantic=True`` with an async body."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel
from sqlalchemy import literal, select

from async_session_task import AsyncSessionTask, current_session, task
from tests.apps.pg_app import app

__all__ = ["app"]


class Book(BaseModel):
    title: str
    pages: int


class Renamed(BaseModel):
    title: str
    changed: bool


@app.task(base=AsyncSessionTask, pydantic=True, shared=False)
async def rename_book(book: Book, title: str) -> Renamed:
    """Arguments validated into a model by Celery; the returned model must be dumped."""
    await asyncio.sleep(0)
    return Renamed(title=title, changed=book.title != title)


@task(app, autocommit=True, shared=False)
async def count_to(n: int, label: str) -> str:
    """Registered by ``task()``: a body with the run's session."""
    value = await current_session().scalar(select(literal(n)))
    return f"{label}:{value}"


@task(app, bind=True, shared=False)
async def own_name(self: AsyncSessionTask[[int], str], n: int) -> str:
    """``bind=True``: the body gets the task."""
    value = await self.session.scalar(select(literal(n)))
    return f"{self.name}:{value}"
