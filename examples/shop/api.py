"""Request handlers, FastAPI style, minus FastAPI. In a FastAPI app::

@router.post("/orders")
async def create_order(order: OrderIn, session: AsyncSession = Depends(get_session)):
    ...
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from . import repository, tasks


async def create_order(session: AsyncSession, sku: str, quantity: int) -> dict[str, Any]:
    """Record the order, then let a worker confirm it."""
    order = await repository.place_order(session, sku, quantity)
    # Commit before sending: the worker's own session must find the row.
    await session.commit()
    result = tasks.confirm_order.delay(order.id)
    return {"id": order.id, "status": order.status, "task_id": result.id}
