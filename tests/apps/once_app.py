"""Tasks that must have their database effect once, for ``tests/test_once.py``.

``pg_app``'s app with more tasks (``celery -A tests.apps.once_app worker``).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from sqlalchemy import select, update

from async_session_task import AsyncSessionTask, pgbouncer_engine_options
from tests.apps.models import Account, Note
from tests.apps.pg_app import app

if os.environ.get("AST_PGBOUNCER") == "1":  # through PgBouncer in transaction pooling mode
    app.conf.async_session_engine_options = pgbouncer_engine_options(
        **app.conf.async_session_engine_options
    )

#: Attempts of each run (by task id) in this process: a re-run calls the body again.
attempts: Counter[str] = Counter()


@app.task(bind=True, base=AsyncSessionTask, idempotent=True, autocommit=True)
async def charge(self: AsyncSessionTask, key: str, pause: float = 0.0) -> str:
    """Writes one note per run; keyed by the task id."""
    self.session.add(Note(key=key, text=self.request.id))
    await self.session.flush()
    await asyncio.sleep(pause)  # a concurrent run of the same id meets this one's marker
    return str(self.request.id)


@app.task(
    bind=True,
    base=AsyncSessionTask,
    idempotent=lambda key, pause=0.0: f"order:{key}",
    autocommit=True,
)
async def charge_per_order(self: AsyncSessionTask, key: str, pause: float = 0.0) -> str:
    """As :func:`charge`, keyed by the order, whatever the task id."""
    self.session.add(Note(key=key, text=self.request.id))
    await self.session.flush()
    await asyncio.sleep(pause)
    return str(self.request.id)


@app.task(
    bind=True, base=AsyncSessionTask, idempotent=True, acks_late=True, reject_on_worker_lost=True
)
async def commit_then_die(self: AsyncSessionTask, key: str) -> str:
    """Commits its note, then its process dies before the message is acknowledged."""
    self.session.add(Note(key=key, text=str(os.getpid())))
    await self.session.commit()
    if not (self.request.delivery_info or {}).get("redelivered"):
        os._exit(1)
    return "ran again"


@app.task(
    bind=True,
    base=AsyncSessionTask,
    isolation_level="SERIALIZABLE",
    retry_on_conflict=30,
    autocommit=True,
)
async def transfer(self: AsyncSessionTask, source: str, target: str, amount: int) -> int:
    """Read-modify-write of two balances; returns the attempts this run took."""
    attempts[self.request.id] += 1
    rows = await self.session.scalars(select(Account).where(Account.id.in_([source, target])))
    accounts = {account.id: account for account in rows}
    await asyncio.sleep(0.005)  # others read the same balances meanwhile
    accounts[source].balance -= amount
    accounts[target].balance += amount
    return attempts[self.request.id]


@app.task(bind=True, base=AsyncSessionTask, retry_on_conflict=3, autocommit=True)
async def lock_both(self: AsyncSessionTask, first: str, second: str, pause: float) -> int:
    """Adds 1 to two balances, locking ``first`` then ``second``: two runs in opposite order
    deadlock, and PostgreSQL aborts one of them."""
    attempts[self.request.id] += 1
    for account, wait in ((first, pause), (second, 0.0)):
        await self.session.execute(
            update(Account).where(Account.id == account).values(balance=Account.balance + 1)
        )
        await asyncio.sleep(wait)
    return attempts[self.request.id]


@app.task(bind=True, base=AsyncSessionTask, idempotent=True)
async def commit_twice(self: AsyncSessionTask, key: str) -> Any:
    """An idempotent run that commits twice: the second commit fails."""
    self.session.add(Note(key=key, text="first"))
    await self.session.commit()
    self.session.add(Note(key=key, text="second"))
    await self.session.commit()


class Conflict(Exception):
    """A serialization failure, as ``retry_on_conflict`` sees one (its SQLSTATE)."""

    sqlstate = "40001"


@app.task(bind=True, base=AsyncSessionTask, retry_on_conflict=10_000, soft_time_limit=1)
async def conflicts_forever(self: AsyncSessionTask) -> None:
    """Every attempt fails with a conflict: the soft time limit ends them all."""
    attempts[self.request.id] += 1
    await asyncio.sleep(0.05)
    raise Conflict(f"attempt {attempts[self.request.id]}")
