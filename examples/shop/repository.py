"""The repository: plain async functions that take the session they work in.

The web app passes the request's session; a task passes ``self.session``. Neither commits:
the caller owns the transaction.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .models import Order, Product


async def add_product(session: AsyncSession, sku: str, stock: int) -> Product:
    product = Product(sku=sku, stock=stock)
    session.add(product)
    await session.flush()
    return product


async def place_order(session: AsyncSession, sku: str, quantity: int) -> Order:
    product = await session.scalar(select(Product).where(Product.sku == sku))
    if product is None:
        raise LookupError(f"no product {sku!r}")
    order = Order(product_id=product.id, quantity=quantity, status="pending")
    session.add(order)
    await session.flush()
    return order


async def confirm_order(session: AsyncSession, order_id: int) -> Order:
    """Take the stock for a pending order, or reject it if there is not enough."""
    order = await session.get_one(Order, order_id)
    if order.status == "pending":
        # One conditional UPDATE: right with concurrent workers on any database, where
        # read-then-write would lose updates.
        taken = await session.scalar(
            update(Product)
            .where(Product.id == order.product_id, Product.stock >= order.quantity)
            .values(stock=Product.stock - order.quantity)
            .returning(Product.id)
        )
        order.status = "rejected" if taken is None else "confirmed"
    return order
