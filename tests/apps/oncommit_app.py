"""Tasks that queue messages with ``on_commit``, for ``tests/test_on_commit.py``.

``pg_app``'s app with more tasks (``celery -A tests.apps.oncommit_app worker``). The messages
they queue go to a hold queue (``AST_HOLD_QUEUE``) that no worker consumes: the tests read it
to see what was published, in which order, and when.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from celery import Celery, Task, chain, group, signals
from celery.canvas import Signature
from celery.exceptions import Ignore, Reject
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from async_session_task import AsyncSessionTask, on_commit
from async_session_task._on_commit import publish_failures
from tests.apps.models import Note
from tests.apps.pg_app import app

HOLD_QUEUE = os.environ.get("AST_HOLD_QUEUE", "hold")
HELD = "tests.apps.oncommit_app.held"
#: Its publish takes SLOW_PUBLISH seconds (a before_task_publish handler sleeps).
SLOW = "tests.apps.oncommit_app.held_slowly"
SLOW_PUBLISH = 0.5
app.conf.task_routes = {HELD: {"queue": HOLD_QUEUE}, SLOW: {"queue": HOLD_QUEUE}}

#: An app whose broker is down: nothing listens on port 1.
dead_app = Celery("dead", broker="redis://127.0.0.1:1/0", set_as_current=False)
dead_app.conf.update(
    broker_connection_timeout=1,
    task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1},
)
DEAD = "dead.task"


@signals.before_task_publish.connect(weak=False)
def _slow_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    if (headers or {}).get("task") == SLOW:
        time.sleep(SLOW_PUBLISH)  # a slow broker: the thread that publishes waits


@app.task(base=AsyncSessionTask, name=HELD)
async def held(key: str, label: str) -> None:
    """Never run: its messages wait in the hold queue, where the tests read them."""


def hold(key: str, label: str, name: str = HELD) -> Signature:
    return app.signature(name, args=(key, label), queue=HOLD_QUEUE, immutable=True)


async def wait_for_test(task: Task, key: str, state: str) -> None:
    """Report ``state``, then wait (on the database server) until the test lets go of the
    advisory lock named ``key``."""
    task.update_state(state=state)
    await task.session.execute(text("select pg_advisory_xact_lock(hashtext(:k))"), {"k": key})


@app.task(bind=True, base=AsyncSessionTask)
async def in_order(self: AsyncSessionTask, key: str) -> list[str]:
    """Queues messages every way there is; commits once the test lets it."""
    self.session.add(Note(key=key, text="parent"))
    ids = [
        on_commit(hold(key, "1")).id,
        held.delay_on_commit(key, "2").id,
        held.apply_async_on_commit((key, "3")).id,
    ]
    ids.append(on_commit(chain(hold(key, "4a"), hold(key, "4b"))).parent.id)
    ids.extend(r.id for r in on_commit(group(hold(key, "5a"), hold(key, "5b"))).results)
    await wait_for_test(self, key, "QUEUED")
    await self.session.commit()
    return ids


@app.task(bind=True, base=AsyncSessionTask)
async def failed_commit(self: AsyncSessionTask, key: str, how: str) -> str:
    """The commit fails (``how``: deferred constraint, dropped connection); then a new
    transaction of the same session queues and commits ``after``."""
    on_commit(hold(key, "lost"))
    self.session.add(Note(key=key, text="lost"))
    if how == "deferred":
        insert = text("insert into oncommit_deferred (k) values (:k)")
        await self.session.execute(insert, {"k": key})
        await self.session.execute(insert, {"k": key})  # checked at COMMIT only
    else:
        pid = await self.session.scalar(text("select pg_backend_pid()"))
        engine = self.session.bind
        assert isinstance(engine, AsyncEngine)
        async with engine.connect() as other:
            await other.execute(text("select pg_terminate_backend(:p)"), {"p": pid})
    try:
        await self.session.commit()
    except DBAPIError as error:  # its subclass depends on when the driver notices
        failure = f"DBAPIError:{type(error).__name__}"
    else:
        raise AssertionError("the commit did not fail")
    await self.session.rollback()
    on_commit(hold(key, "after"))
    await self.session.commit()
    return failure


@app.task(bind=True, base=AsyncSessionTask, max_retries=2, default_retry_delay=0)
async def discarded(self: AsyncSessionTask, key: str, how: str) -> str:
    """Queues a message, then ends its transaction without committing, as ``how`` says."""
    on_commit(hold(key, f"{how}-{self.request.retries}"))
    self.session.add(Note(key=key, text=how))
    await self.session.flush()
    if how in ("rollback", "close"):
        await (self.session.rollback() if how == "rollback" else self.session.close())
        on_commit(hold(key, "next"))  # the session's next transaction
        await self.session.commit()
    elif how == "error":
        raise ValueError(key)
    elif how == "retry" and self.request.retries == 0:
        raise self.retry()
    elif how == "retry":
        await self.session.commit()  # the retried run's own message only
    elif how == "ignore":
        raise Ignore()
    elif how == "reject":
        raise Reject("on purpose", requeue=False)
    elif how in ("soft_limit", "revoke"):
        self.update_state(state="QUEUED")
        await asyncio.sleep(60)
    return how


@app.task(bind=True, base=AsyncSessionTask)
async def savepoints(self: AsyncSessionTask, key: str) -> None:
    on_commit(hold(key, "outer-1"))
    async with self.session.begin_nested():
        on_commit(hold(key, "released"))
        async with self.session.begin_nested():
            on_commit(hold(key, "inner-released"))
    nested = await self.session.begin_nested()
    on_commit(hold(key, "rolled-back"))
    await nested.rollback()
    try:
        async with self.session.begin_nested():
            on_commit(hold(key, "rolled-back-by-error"))
            raise LookupError(key)
    except LookupError:
        pass
    on_commit(hold(key, "outer-2"))
    await wait_for_test(self, key, "RELEASED")
    await self.session.commit()


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def autocommitted(self: AsyncSessionTask, key: str, fail: bool = False) -> None:
    self.session.add(Note(key=key, text="auto"))
    held.delay_on_commit(key, "auto")
    if fail:
        raise ValueError(key)


async def ticks_during(commit: Callable[[], Awaitable[None]]) -> int:
    """How many times another coroutine ran (every 10 ms) while ``commit()`` was awaited."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    before = ticks
    try:
        await commit()
    finally:
        ticker.cancel()
    return ticks - before


@app.task(bind=True, base=AsyncSessionTask)
async def slow_publish(self: AsyncSessionTask, key: str) -> int:
    """How many times another coroutine ran while the commit published slowly."""
    on_commit(hold(key, "slow", SLOW))
    return await ticks_during(self.session.commit)


@app.task(bind=True, base=AsyncSessionTask)
async def to_dead_broker(self: AsyncSessionTask, key: str) -> dict[str, Any]:
    before = publish_failures()
    result = on_commit(dead_app.signature(DEAD, args=(key,)))
    self.session.add(Note(key=key, text="committed"))
    await self.session.commit()
    return {"before": before, "after": publish_failures(), "id": result.id}


@app.task(bind=True, base=AsyncSessionTask)
async def find_note(self: AsyncSessionTask, key: str) -> bool:
    """Whether the note ``key`` is committed, as this run's own session sees it."""
    count = await self.session.scalar(select(func.count()).select_from(Note).where(Note.key == key))
    return bool(count)
