"""Fan out with ``group`` and gather with ``chord``: every task is ``async def``.

Each ``score_user`` run has its own session (and commits its own row); ``summarize`` runs
once all of them are done, with their results, and stores a summary.

    celery -A examples.fanout worker -P threads
    python3 -m examples.fanout
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from celery import Celery, chord, group
from celery.result import AsyncResult
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from async_session_task import AsyncSessionTask
from examples import settings

app = Celery("examples.fanout")
app.conf.update(settings.celery_settings(), async_session_url=settings.DATABASE_URL)


class Base(DeclarativeBase):
    pass


class Score(Base):
    __tablename__ = "fanout_scores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(String(40), index=True)
    user_id: Mapped[int] = mapped_column(Integer)
    value: Mapped[int] = mapped_column(Integer)


class Summary(Base):
    __tablename__ = "fanout_summaries"
    run: Mapped[str] = mapped_column(String(40), primary_key=True)
    users: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def score_user(self: AsyncSessionTask, run: str, user_id: int) -> int:
    value = user_id * user_id % 97  # stands in for real work
    self.session.add(Score(run=run, user_id=user_id, value=value))
    return value


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def summarize(self: AsyncSessionTask, values: list[int], run: str) -> dict[str, Any]:
    """The chord's body: ``values`` are the header's results, in order."""
    stored = await self.session.scalar(select(func.sum(Score.value)).where(Score.run == run))
    self.session.add(Summary(run=run, users=len(values), total=sum(values)))
    return {"run": run, "users": len(values), "total": sum(values), "stored": stored}


def score_everyone(run: str, user_ids: list[int]) -> AsyncResult:
    """One task per user, then one summary: ``chord(group(...))(summarize)``."""
    header = group(score_user.s(run, user_id) for user_id in user_ids)
    return chord(header)(summarize.s(run))


def main() -> None:
    asyncio.run(settings.create_tables(Base.metadata))
    result = score_everyone(f"run-{uuid.uuid4().hex[:8]}", list(range(1, 51)))
    print(json.dumps(result.get(timeout=120)))


if __name__ == "__main__":
    main()
