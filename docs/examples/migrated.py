"""After: the same task, on this library. One loop and one pool per worker process."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select

from async_session_task import AsyncSessionTask

from .models import Customer

app = Celery("crm")
app.conf.async_session_url = "postgresql+asyncpg://app@127.0.0.1/crm"


@app.task(bind=True, base=AsyncSessionTask)
async def customer_id(self: AsyncSessionTask, email: str) -> int | None:
    return await self.session.scalar(select(Customer.id).where(Customer.email == email))
