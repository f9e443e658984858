"""The tables the test apps write to, on PostgreSQL (pg_app) and on SQLite (sqlite_app)."""

from __future__ import annotations

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import outbox_table, runs_table


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(String(200))


class Account(Base):
    """Balances that the exactly-once tests move between accounts (tests/apps/once_app.py)."""

    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    balance: Mapped[int] = mapped_column(Integer)


# The tables the library writes to, in the users' own metadata (docs/running-once.md and
# docs/outbox.md).
runs = runs_table(Base.metadata)
outbox = outbox_table(Base.metadata)
