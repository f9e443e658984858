"""Tests of the shop's tasks: in process and rolled back, then once on a real worker."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from async_session_task.testing import RollbackSessions, WorkerProcess
from examples import settings
from examples.shop import repository, tasks
from examples.shop.models import Product


async def new_order(session: AsyncSession, stock: int, quantity: int) -> int:
    await repository.add_product(session, "mug", stock)
    order = await repository.place_order(session, "mug", quantity)
    await session.commit()  # releases a savepoint; the test's transaction is rolled back
    return order.id


def test_confirming_takes_the_stock(async_session_rollback: RollbackSessions) -> None:
    order_id = async_session_rollback.run(lambda session: new_order(session, 5, 2))

    assert tasks.confirm_order.apply(args=(order_id,)).get() == "confirmed"

    stock = async_session_rollback.run(
        lambda session: session.scalar(select(Product.stock).where(Product.sku == "mug"))
    )
    assert stock == 3


def test_each_test_starts_clean(async_session_rollback: RollbackSessions) -> None:
    # "mug" again: the previous test's product (unique sku) was rolled back.
    order_id = async_session_rollback.run(lambda session: new_order(session, 1, 2))

    assert tasks.confirm_order.apply(args=(order_id,)).get() == "rejected"


async def committed_order(sku: str) -> int:
    """A real commit, for a worker to see, with an engine of this test's own event loop."""
    engine = create_async_engine(settings.DATABASE_URL)
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await repository.add_product(session, sku, 3)
            order = await repository.place_order(session, sku, 1)
            await session.commit()
            return order.id
    finally:
        await engine.dispose()


def test_a_real_worker_confirms_it(async_session_worker: WorkerProcess) -> None:
    order_id = asyncio.run(committed_order(f"lamp-{uuid.uuid4().hex[:8]}"))

    result = async_session_worker.send(tasks.confirm_order, order_id)

    assert result.get(timeout=60) == "confirmed"
