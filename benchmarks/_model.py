"""The one table of the DB workload: a counter per row, read by primary key."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "bench_counter"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]
