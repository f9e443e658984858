"""Tasks of the typing tests, on the test app: ``pydantic=True`` with an async body."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from async_session_task import AsyncSessionTask
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
