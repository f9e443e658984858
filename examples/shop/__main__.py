"""Play the web server: a few requests, each with its own session from ``get_session``.

Needs a worker (``celery -A examples.shop.tasks worker -P threads``). Prints one JSON line:
the orders as the requests returned them, and their status once the worker is done.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from celery.result import AsyncResult

from examples import settings

from . import api, db, repository, tasks
from .models import Base, Order


async def handle_requests(sku: str) -> list[dict[str, Any]]:
    await settings.create_tables(Base.metadata)
    async for session in db.get_session():
        await repository.add_product(session, sku, stock=5)
        await session.commit()
    responses = []
    for quantity in (2, 2, 2):  # the third finds 1 left: rejected
        async for session in db.get_session():  # what Depends(get_session) does per request
            responses.append(await api.create_order(session, sku, quantity))
    return responses


async def statuses(ids: list[int]) -> list[str]:
    async with db.SessionLocal() as session:
        return [(await session.get_one(Order, order_id)).status for order_id in ids]


async def main() -> None:
    sku = f"mug-{uuid.uuid4().hex[:8]}"
    responses = await handle_requests(sku)
    for response in responses:  # wait for the worker, off the event loop
        result = AsyncResult(response["task_id"], app=tasks.app)
        await asyncio.to_thread(result.get, timeout=60)
    print(
        json.dumps(
            {"sku": sku, "placed": responses, "final": await statuses([r["id"] for r in responses])}
        )
    )
    await db.engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
