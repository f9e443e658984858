"""Retry on a transient database error, with exponential backoff.

A locked table, a serialization failure, a dropped connection: the next attempt will likely
succeed. The body decides what is transient, then calls ``self.retry()``. The failed
attempt's session is rolled back and closed when the body ends; the retry, published after
that, runs with a new session (and a healthy connection from the pool).

Declaratively, ``autoretry_for=(OperationalError,), retry_backoff=True`` does the same for
one exception class.

    celery -A examples.retrying worker -P threads
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import Integer, String, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask
from examples import settings

#: PostgreSQL SQLSTATEs worth another try: serialization failure, deadlock, lock not available.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

# Give up on a lock quickly and retry later, rather than hold a worker thread waiting.
if settings.DATABASE_URL.startswith("sqlite"):
    LOCK_WAIT: dict[str, Any] = {"connect_args": {"timeout": 1}}
else:
    LOCK_WAIT = {"connect_args": {"server_settings": {"lock_timeout": "1000"}}}

app = Celery("examples.retrying")
app.conf.update(
    settings.celery_settings(),
    async_session_url=settings.DATABASE_URL,
    async_session_engine_options=LOCK_WAIT,
)


class Base(DeclarativeBase):
    pass


class Stock(Base):
    __tablename__ = "retrying_stock"
    sku: Mapped[str] = mapped_column(String(40), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)


def is_transient(error: DBAPIError) -> bool:
    """Whether trying again later may succeed."""
    if error.connection_invalidated:  # the connection dropped; the pool replaces it
        return True
    if isinstance(error, OperationalError):  # SQLite: "database is locked"
        return True
    return getattr(error.orig, "sqlstate", None) in TRANSIENT_SQLSTATES


@app.task(bind=True, base=AsyncSessionTask, max_retries=8)
async def restock(self: AsyncSessionTask, sku: str, quantity: int) -> dict[str, Any]:
    try:
        await self.session.execute(
            update(Stock).where(Stock.sku == sku).values(quantity=Stock.quantity + quantity)
        )
        await self.session.commit()
    except DBAPIError as error:
        if not is_transient(error):
            raise
        # 0-1 s, then 0-2 s, 0-4 s, ... at most 30 s ("full jitter" spreads the retries).
        countdown = get_exponential_backoff_interval(
            factor=1, retries=self.request.retries, maximum=30, full_jitter=True
        )
        raise self.retry(exc=error, countdown=countdown) from error
    return {"sku": sku, "retries": self.request.retries}
