"""The web app's database setup: one engine, one ``async_sessionmaker``, one dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from examples import settings

engine = create_async_engine(settings.DATABASE_URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    """The FastAPI dependency: ``session: AsyncSession = Depends(get_session)``."""
    async with SessionLocal() as session:
        yield session
