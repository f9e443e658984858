"""The Celery app of the orders service: its tasks use the web app's ``SessionLocal``."""

from __future__ import annotations

from celery import Celery

from async_session_task import AsyncSessionTask
from examples import settings

from .models import Order

app = Celery("orders")
app.conf.update(
    settings.celery_settings(),
    async_session_maker="examples.fastapi_orders.db:SessionLocal",
)


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def process_order(self: AsyncSessionTask, order_id: int) -> str:
    # get_one() raises NoResultFound if the order is not committed yet: the race that
    # on_commit() in the web handler rules out.
    order = await self.session.get_one(Order, order_id)
    order.status = "processed"
    return order.status
