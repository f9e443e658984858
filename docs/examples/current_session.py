"""A repository that works in a web request (session passed in) and in a task (found)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from async_session_task import current_session

from .models import Customer


async def find_customer(email: str, session: AsyncSession | None = None) -> Customer | None:
    """Inside a task, ``session`` may be left out: the run's own session is used."""
    session = session or current_session()
    return await session.scalar(select(Customer).where(Customer.email == email))
