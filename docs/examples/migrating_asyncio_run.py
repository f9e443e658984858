"""Before: ``asyncio.run()`` in every task, with an engine made (and disposed) per call.

A module-level pooled engine cannot be shared by those loops ("attached to a different
loop"), so each call connects anew.
"""

from __future__ import annotations

import asyncio

from celery import Celery
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from .models import Customer

app = Celery("crm")
DATABASE_URL = "postgresql+asyncpg://app@127.0.0.1/crm"


async def _customer_id(email: str) -> int | None:
    engine = create_async_engine(DATABASE_URL)
    try:
        async with async_sessionmaker(engine)() as session:
            return await session.scalar(select(Customer.id).where(Customer.email == email))
    finally:
        await engine.dispose()


@app.task
def customer_id(email: str) -> int | None:
    return asyncio.run(_customer_id(email))
