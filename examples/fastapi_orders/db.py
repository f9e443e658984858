"""The web app's database setup, shared with its tasks: one ``async_sessionmaker``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from examples import settings

engine = create_async_engine(settings.DATABASE_URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    """The request's session (``Depends(get_session)``), closed when the response is sent."""
    async with SessionLocal() as session:
        yield session
