"""An order and the message that processes it commit together, and the message is delivered
even if the broker is down at that moment.

The web side (``place_order``) queues ``process_order`` with ``on_commit(..., durable=True)``:
the message is written to ``async_session_outbox`` in the order's transaction, published
right after the COMMIT, and its row deleted. If the broker refuses, the row stays, and the
relay that runs inside each worker (``async_session_outbox_relay``) delivers it once the
grace period is over. ``process_order`` is idempotent, so a message delivered twice (a relay
that died between publish and delete) processes the order once (docs/outbox.md).

    celery -A examples.outbox worker -P threads
    python -m examples.outbox
"""

from __future__ import annotations

import asyncio
import json
import sys

from celery import Celery
from sqlalchemy import Integer, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask, on_commit, outbox_table, runs_table
from examples import settings

app = Celery("examples.outbox")
# --8<-- [start:settings]
app.conf.update(
    settings.celery_settings(),
    async_session_url=settings.DATABASE_URL,
    # Every worker delivers what the fast path left (one relay thread per worker).
    async_session_outbox_relay=True,
    # How long a new row is left to the fast path: 10 s by default; short for the demo.
    async_session_outbox_grace=2.0,
)
# --8<-- [end:settings]


class Base(DeclarativeBase):
    pass


# --8<-- [start:tables]
outbox_table(Base.metadata)  # the messages of durable calls
runs_table(Base.metadata)  # the markers of idempotent runs
# --8<-- [end:tables]


class Order(Base):
    __tablename__ = "outbox_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item: Mapped[str] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(20))


@app.task(bind=True, base=AsyncSessionTask, idempotent=True, autocommit=True)
async def process_order(self: AsyncSessionTask, order_id: int) -> str:
    order = await self.session.get_one(Order, order_id)
    order.status = "processed"
    return order.status


# --8<-- [start:place_order]
SessionLocal = async_sessionmaker(
    create_async_engine(settings.DATABASE_URL), expire_on_commit=False
)


async def place_order(item: str, sender: Celery = app) -> tuple[int, str]:
    """The web side: the order and its message commit together. ``sender`` is the app whose
    broker the message is first published to."""
    async with SessionLocal() as session:
        order = Order(item=item, status="placed")
        session.add(order)
        await session.flush()
        message = sender.signature(process_order.name, args=(order.id,))
        result = on_commit(message, session=session, durable=True)
        await session.commit()
        return order.id, result.id


# --8<-- [end:place_order]


async def main() -> dict[str, list[int]]:
    await settings.create_tables(Base.metadata)
    placed, _ = await place_order("a book")
    # The same call while the broker is down (nothing listens on port 1): the commit
    # succeeds, and the message waits in the outbox for the relay.
    down = Celery("examples.outbox-down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    down.conf.task_default_queue = app.conf.task_default_queue
    relayed, _ = await place_order("a lamp", sender=down)
    await SessionLocal.kw["bind"].dispose()
    return {"placed": [placed], "relayed": [relayed]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), file=sys.stdout)
