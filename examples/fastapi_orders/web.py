"""The FastAPI app: ``POST /orders`` records an order and queues its processing;
``POST /orders/{id}/process`` sends the task again and awaits its result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from async_session_task import aget, on_commit
from examples import settings

from . import db, tasks
from .models import Base, Order


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    await settings.create_tables(Base.metadata)  # a migration tool's job in a real project
    yield
    await db.engine.dispose()


app = FastAPI(lifespan=lifespan)
Session = Annotated[AsyncSession, Depends(db.get_session)]


class OrderIn(BaseModel):
    item: str


class OrderOut(BaseModel):
    id: int
    status: str
    task_id: str | None = None


@app.post("/orders", status_code=201)
async def create_order(order_in: OrderIn, session: Session) -> OrderOut:
    order = Order(item=order_in.item)
    session.add(order)
    await session.flush()  # the order's id
    # Published when this transaction commits, not now: a worker that picked the message up
    # at once would not find the order yet. The id is known already.
    result = on_commit(tasks.process_order.s(order.id), session=session)
    await session.commit()  # returns once the message is with the broker
    return OrderOut(id=order.id, status=order.status, task_id=result.id)


# --8<-- [start:process_now]
@app.post("/orders/{order_id}/process")
async def process_now(order_id: int) -> OrderOut:
    """Process an existing order again and wait for the worker's answer, without blocking
    the loop that serves the other requests (docs/calling.md)."""
    result = await tasks.process_order.adelay(order_id)  # once the broker has the message
    status = await aget(result, timeout=30)
    return OrderOut(id=order_id, status=status, task_id=result.id)


# --8<-- [end:process_now]


@app.get("/orders/{order_id}")
async def read_order(order_id: int, session: Session) -> OrderOut:
    order = await session.get_one(Order, order_id)
    return OrderOut(id=order.id, status=order.status)
