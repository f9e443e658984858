"""The shop's ORM models."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "shop_products"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(String(40), unique=True)
    stock: Mapped[int] = mapped_column(Integer)


class Order(Base):
    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey(Product.id))
    quantity: Mapped[int] = mapped_column(Integer)
    #: "pending" when placed; the worker makes it "confirmed" or "rejected".
    status: Mapped[str] = mapped_column(String(20), default="pending")
