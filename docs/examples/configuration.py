"""Settings in ``app.conf``, a second database for some tasks, options per task."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


app = Celery("shop", broker="redis://127.0.0.1:6379/0")
app.conf.update(
    # Where every AsyncSessionTask of this app gets its sessions...
    async_session_url="postgresql+asyncpg://app:secret@db.internal/shop",
    # ...through one engine per worker process, built with these create_async_engine options...
    async_session_engine_options={"pool_size": 5, "max_overflow": 5, "pool_pre_ping": True},
    # ...and these async_sessionmaker options (expire_on_commit=False unless given).
    async_session_options={"autoflush": True},
)


class WarehouseTask(AsyncSessionTask):
    """Tasks on this base use the warehouse database: a class attribute beats app.conf."""

    abstract = True
    async_session_url = "postgresql+asyncpg://app:secret@warehouse.internal/stock"


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def record(self: AsyncSessionTask, name: str) -> int:
    """``autocommit=True``: committed after the body returns, inside the run."""
    event = Event(name=name)
    self.session.add(event)
    await self.session.flush()
    return event.id


@app.task(bind=True, base=WarehouseTask, autocommit=True)
async def record_in_warehouse(self: AsyncSessionTask, name: str) -> int:
    event = Event(name=name)
    self.session.add(event)
    await self.session.flush()
    return event.id
