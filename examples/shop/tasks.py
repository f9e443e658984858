"""The shop's Celery app: its tasks use the web app's ``SessionLocal`` and repository."""

from __future__ import annotations

from celery import Celery

from async_session_task import AsyncSessionTask
from examples import settings

from . import repository

app = Celery("shop")
app.conf.update(
    settings.celery_settings(),
    # The web app's own factory: same models, same options, one engine per worker process.
    async_session_maker="examples.shop.db:SessionLocal",
)


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def confirm_order(self: AsyncSessionTask, order_id: int) -> str:
    """``autocommit``: committed after the body returns, inside the run."""
    order = await repository.confirm_order(self.session, order_id)
    return order.status
