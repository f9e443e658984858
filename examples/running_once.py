"""Charge an order once, however often its message is delivered; move money under
SERIALIZABLE, running the transaction again when PostgreSQL aborts it.

``charge`` is keyed by its order: the marker row ``charge:<order_id>`` commits in the same
transaction as the payment, so a redelivery (``acks_late`` after a lost worker) or a second
message for the same order is skipped. ``transfer`` reads and writes two balances at
``SERIALIZABLE``; a serialization failure or a deadlock runs the body again in the same
Celery run, with a new session (docs/running-once.md).

    celery -A examples.running_once worker -P threads
"""

from __future__ import annotations

import datetime

from celery import Celery
from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask, cleanup_runs, current_session, runs_table
from examples import settings

app = Celery("examples.running_once")
app.conf.update(settings.celery_settings(), async_session_url=settings.DATABASE_URL)


class Base(DeclarativeBase):
    pass


# --8<-- [start:table]
# The markers' table, created and migrated with the rest of the schema.
runs_table(Base.metadata)
# --8<-- [end:table]


class Account(Base):
    __tablename__ = "once_accounts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    balance: Mapped[int] = mapped_column(Integer)


class Payment(Base):
    __tablename__ = "once_payments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[str] = mapped_column(String(40), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("once_accounts.id"))
    amount: Mapped[int] = mapped_column(Integer)


# --8<-- [start:charge]
@app.task(
    bind=True,
    base=AsyncSessionTask,
    idempotent=lambda order_id, account_id, amount: f"charge:{order_id}",
    autocommit=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
async def charge(self: AsyncSessionTask, order_id: str, account_id: str, amount: int) -> int:
    """Debit ``account_id`` once per order; returns the new balance."""
    account = await self.session.get_one(Account, account_id, with_for_update=True)
    account.balance -= amount
    self.session.add(Payment(order_id=order_id, account_id=account_id, amount=amount))
    return account.balance


# --8<-- [end:charge]


# --8<-- [start:transfer]
@app.task(
    bind=True,
    base=AsyncSessionTask,
    isolation_level="SERIALIZABLE",
    retry_on_conflict=10,
    autocommit=True,
)
async def transfer(self: AsyncSessionTask, source: str, target: str, amount: int) -> None:
    """Read both balances, then write both: under SERIALIZABLE, two transfers that read the
    same balance cannot both commit; the one aborted runs again and sees the other's."""
    rows = await self.session.scalars(select(Account).where(Account.id.in_([source, target])))
    accounts = {account.id: account for account in rows}
    if accounts[source].balance < amount:
        raise ValueError(f"{source} has {accounts[source].balance}, less than {amount}")
    accounts[source].balance -= amount
    accounts[target].balance += amount


# --8<-- [end:transfer]


# --8<-- [start:cleanup]
@app.task(base=AsyncSessionTask)
async def cleanup(days: float = 7) -> int:
    """Run from celery beat: delete the markers older than ``days``; how many went."""
    engine = current_session().bind
    assert isinstance(engine, AsyncEngine)
    return await cleanup_runs(engine, older_than=datetime.timedelta(days=days))


# --8<-- [end:cleanup]
