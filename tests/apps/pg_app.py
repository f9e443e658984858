"""The Celery app that the tests run in real ``celery worker`` processes.

Configured from the environment (see ``tests/helpers.py``), so the same module serves the
test process (to send tasks) and every worker (to run them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
from celery import Celery, group
from celery.exceptions import Ignore, Reject
from sqlalchemy import Integer, String, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from async_session_task import AsyncSessionTask, apublish, current_session
from tests.apps.models import Base, Note

logger = logging.getLogger(__name__)


class Counter(Base):
    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


app = Celery(
    "pg_app",
    broker=os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("AST_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    async_session_url=os.environ.get("AST_DATABASE_URL"),
    async_session_engine_options=json.loads(os.environ.get("AST_ENGINE_OPTIONS", "{}")),
    task_default_queue=os.environ.get("AST_QUEUE", "celery"),
    result_expires=600,
    broker_connection_retry_on_startup=True,
)


async def count_notes(key: str) -> int:
    """An 'existing repository function': it only knows current_session()."""
    count = await current_session().scalar(
        select(func.count()).select_from(Note).where(Note.key == key)
    )
    return int(count or 0)


@app.task(bind=True, base=AsyncSessionTask)
async def probe(self: AsyncSessionTask, delay: float = 0.0) -> dict[str, Any]:
    """Reports what the body sees before and after an await."""
    started = time.time()
    session, request = self.session, self.request
    before = {"session": id(session), "id": request.id, "args": list(request.args)}
    await asyncio.sleep(delay)
    backend_pid = await session.scalar(text("select pg_backend_pid()"))
    in_run_sync = await session.run_sync(lambda _: self.request.id)
    return {
        "before": before,
        "after": {"session": id(self.session), "id": self.request.id, "args": self.request.args},
        "current_session_same": current_session() is session,
        "run_sync_request_id": in_run_sync,
        "retries": self.request.retries,
        "parent_id": self.request.parent_id,
        "routing_key": (self.request.delivery_info or {}).get("routing_key"),
        "pid": os.getpid(),
        "backend_pid": backend_pid,
        "started": started,
        "ended": time.time(),
    }


@app.task(bind=True, base=AsyncSessionTask, max_retries=3, default_retry_delay=0)
async def outcome(self: AsyncSessionTask, key: str, how: str) -> Any:
    """Writes a note in an open transaction, then ends as ``how`` says."""
    self.session.add(Note(key=key, text=f"{how}:{self.request.retries}"))
    await self.session.flush()
    if how == "commit":
        await self.session.commit()
        return await count_notes(key)
    if how == "error":
        raise ValueError(f"failed on purpose ({key})")
    if how == "retry":
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return self.request.retries
    if how == "ignore":
        raise Ignore()
    if how == "reject":
        raise Reject("rejected on purpose", requeue=False)
    if how == "unserializable":
        return object()
    return "uncommitted"


@app.task(
    bind=True,
    base=AsyncSessionTask,
    autoretry_for=(ValueError,),
    dont_autoretry_for=(KeyError,),
    max_retries=2,
    default_retry_delay=0,
)
async def flaky(self: AsyncSessionTask, key: str, error: str = "ValueError") -> None:
    """Writes a note, then fails: autoretry_for applies to ValueError only."""
    self.session.add(Note(key=key, text=f"attempt:{self.request.retries}"))
    await self.session.flush()
    raise {"ValueError": ValueError, "KeyError": KeyError}[error](key)


@app.task(bind=True, base=AsyncSessionTask, autocommit=True)
async def bump(self: AsyncSessionTask, name: str) -> int:
    """Increments a counter; ``autocommit`` commits it."""
    counter = await self.session.get(Counter, name)
    if counter is None:
        counter = Counter(name=name, value=0)
        self.session.add(counter)
    counter.value += 1
    await self.session.flush()
    return counter.value


@app.task(bind=True, base=AsyncSessionTask)
async def nested(self: AsyncSessionTask, key: str) -> dict[str, Any]:
    """Calls another task eagerly from inside its body."""
    inner = outcome.apply(args=(key, "commit")).get(disable_sync_subtasks=False)
    return {"inner": inner, "id": self.request.id, "notes": await count_notes(key)}


@app.task(bind=True, base=AsyncSessionTask)
async def report_state(self: AsyncSessionTask) -> str:
    self.update_state(state="PROGRESS", meta={"step": 1})
    await asyncio.sleep(0)
    return str(self.request.id)


@app.task(bind=True, base=AsyncSessionTask, soft_time_limit=1, time_limit=60)
async def sleepy(self: AsyncSessionTask, key: str, seconds: float) -> str:
    """Holds an open transaction past its soft time limit."""
    self.session.add(Note(key=key, text="sleepy"))
    await self.session.flush()
    # No await between this line and the sleep: once it is logged, a cancellation reaches
    # the body inside the try below, not inside flush().
    logger.warning("sleepy %s: sleeping", key)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        logger.warning("sleepy %s: cancelled at its await", key)
        raise
    finally:
        logger.warning("sleepy %s: finally ran", key)
    return "woke"


@app.task(bind=True, base=AsyncSessionTask, time_limit=1)
async def stubborn(self: AsyncSessionTask, key: str, seconds: float) -> str:
    """Past its hard limit, and it swallows the first cancellation."""
    self.session.add(Note(key=key, text="stubborn"))
    await self.session.flush()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        logger.warning("stubborn %s: ignoring cancellation", key)
    await asyncio.sleep(seconds)
    return "done"


@app.task(bind=True, base=AsyncSessionTask)
async def fan_out(self: AsyncSessionTask, count: int) -> list[str]:
    """Publishes tasks and a state update from inside the body."""
    self.update_state(state="PROGRESS", meta={"count": count})
    children = [
        probe.apply_async(queue=self.request.delivery_info["routing_key"]) for _ in range(count)
    ]
    await asyncio.sleep(0)
    return [child.id for child in children]


@app.task(bind=True, base=AsyncSessionTask)
async def pg_sleeper(self: AsyncSessionTask, seconds: float) -> dict[str, float]:
    """Waits on the database server, not on the loop."""
    started = time.time()
    await self.session.execute(text("select pg_sleep(:s)"), {"s": seconds})
    return {"started": started, "ended": time.time()}


@app.task(bind=True, base=AsyncSessionTask)
async def gather_on_session(self: AsyncSessionTask, queries: int) -> None:
    """The mistake the FAQ warns about: concurrent queries on the run's one session."""
    await asyncio.gather(
        *(self.session.execute(text("select pg_sleep(0.01)")) for _ in range(queries))
    )


@app.task(bind=True, base=AsyncSessionTask)
async def exits(self: AsyncSessionTask, how: str) -> None:
    """Raises SystemExit or KeyboardInterrupt from the body, after an await."""
    await asyncio.sleep(0)
    raise {"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt()}[how]


@app.task(bind=True, base=AsyncSessionTask)
async def publish_from_spawned(
    self: AsyncSessionTask, with_group: bool = True
) -> dict[str, list[str]]:
    """Publishes from coroutines the body started: gather, a TaskGroup, create_task; then
    from the body itself, a group too (not on eventlet: docs/faq.md)."""
    queue = self.request.delivery_info["routing_key"]

    async def publish() -> str:
        await asyncio.sleep(0)
        return str(probe.apply_async(queue=queue).id)

    gathered = await asyncio.gather(publish(), publish())
    async with asyncio.TaskGroup() as task_group:
        grouped = [task_group.create_task(publish()) for _ in range(2)]
    created = await asyncio.create_task(publish())
    grouped_ids = (
        [r.id for r in group(probe.s() for _ in range(3)).apply_async(queue=queue).results]
        if with_group
        else []
    )
    return {
        "spawned": [*gathered, *(task.result() for task in grouped), created],
        "body": [str(probe.apply_async(queue=queue).id), *grouped_ids],
    }


@app.task(bind=True, base=AsyncSessionTask)
async def leaves_work_behind(self: AsyncSessionTask, key: str) -> str:
    """Starts a coroutine that would write with the run's session after the run ended."""

    async def background() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            try:
                current_session()
            except RuntimeError as exc:
                logger.warning("background %s: %s", key, exc)
            raise
        current_session().add(Note(key=key, text="late"))
        await current_session().flush()

    asyncio.create_task(background())  # noqa: RUF006  # left behind on purpose
    await asyncio.sleep(0)
    return "returned"


@app.task(bind=True, base=AsyncSessionTask)
async def joins_subtask(self: AsyncSessionTask) -> dict[str, Any]:
    """Waits for a subtask's result from the body, as a sync task may."""
    queue = self.request.delivery_info["routing_key"]
    child = probe.apply_async(queue=queue)
    report = child.get(disable_sync_subtasks=False, timeout=20)
    return {"child": child.id, "child_parent": report["parent_id"], "id": self.request.id}


@app.task(bind=True, base=AsyncSessionTask, async_session_maker="tests.apps.pg_app:second_maker")
async def on_second_database(self: AsyncSessionTask) -> str:
    """Its own async_session_maker, while app.conf sets async_session_url."""
    return str(await self.session.scalar(text("select current_setting('application_name')")))


# A second database, as a task's own async_session_maker (the same server, told apart by the
# application_name of its connections).
second_maker = (
    async_sessionmaker(
        create_async_engine(
            os.environ["AST_DATABASE_URL"],
            connect_args={"server_settings": {"application_name": "ast-second-database"}},
        )
    )
    if os.environ.get("AST_DATABASE_URL")
    else None
)


@app.task(bind=True, base=AsyncSessionTask)
async def uses_anyio(self: AsyncSessionTask, to_thread: bool = True) -> dict[str, Any]:
    """anyio in a body: a task group whose members see the run, a blocking call moved off
    the loop (not under eventlet, see docs/faq.md), a cancel scope."""
    seen: list[str | None] = []

    async def member() -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(self.request.id)

    async with anyio.create_task_group() as task_group:
        for _ in range(3):
            task_group.start_soon(member)
    ident = await anyio.to_thread.run_sync(threading.get_ident) if to_thread else None
    with anyio.move_on_after(0.05) as scope:
        await anyio.sleep(30)
    return {
        "seen": seen,
        "id": self.request.id,
        "off_loop": ident not in (None, threading.get_ident()),
        "moved_on": scope.cancelled_caught,
    }


@app.task(bind=True, base=AsyncSessionTask)
async def publishes_in_run_sync(self: AsyncSessionTask, with_group: bool = True) -> dict[str, Any]:
    """Publishes, updates its state and joins a subtask from sync code given to run_sync()
    (the tuning of docs/performance.md): SQLAlchemy's greenlet, below the body's."""
    queue = self.request.delivery_info["routing_key"]

    def publish(session: Session) -> dict[str, Any]:
        self.update_state(state="PROGRESS", meta={"in": "run_sync"})
        child = probe.apply_async(queue=queue)
        chained = (probe.si() | probe.si()).apply_async(queue=queue)
        published = [child.id, chained.id]
        if with_group:  # not on eventlet: docs/faq.md
            grouped = group(probe.s() for _ in range(2)).apply_async(queue=queue)
            published += [result.id for result in grouped.results]
        report = child.get(disable_sync_subtasks=False, timeout=20)
        return {"child_parent": report["parent_id"], "published": published}

    return await self.session.run_sync(publish)


@app.task(bind=True, base=AsyncSessionTask)
async def keeps_its_session(self: AsyncSessionTask, key: str) -> str:
    """Leaves its session to a callback that uses it after the run ended."""
    session = self.session
    await session.execute(text("select 1"))

    async def late() -> None:
        for what in ("add", "execute"):
            try:
                if what == "add":
                    session.add(Note(key=key, text="late"))
                    await session.flush()
                else:
                    await session.execute(text("select 1"))
            except Exception as exc:
                logger.warning("late %s %s: %s: %s", key, what, type(exc).__name__, exc)
            else:
                logger.warning("late %s %s: done", key, what)

    asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(late()))
    return "returned"


class ReadsSessionInHooks(AsyncSessionTask):
    """Reads ``self.session`` in Celery's hooks around the body."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        super().before_start(task_id, args, kwargs)
        logger.warning("hook before_start %s: %s", task_id, type(self.session).__name__)

    def _hook(self, name: str, task_id: str) -> None:
        try:
            found = type(self.session).__name__
        except RuntimeError as exc:
            found = f"RuntimeError: {exc}"
        logger.warning("hook %s %s: %s", name, task_id, found)

    def on_failure(self, exc: Any, task_id: str, *args: Any) -> None:
        self._hook("on_failure", task_id)

    def after_return(self, status: Any, retval: Any, task_id: str, *args: Any) -> None:
        self._hook("after_return", task_id)


@app.task(bind=True, base=ReadsSessionInHooks)
async def hooked(self: AsyncSessionTask, fail: bool) -> str:
    await self.session.execute(text("select 1"))
    if fail:
        raise ValueError("failed on purpose")
    return "done"


@app.task(bind=True, base=AsyncSessionTask)
async def sends_async(self: AsyncSessionTask, queue: str) -> str:
    """``adelay`` and ``apublish`` inside a body: sent through the worker, as ``delay()``."""
    first = await probe.aapply_async((0.0,), queue=queue)
    second = await apublish(probe.s(0.0).set(queue=queue))
    return f"{first.id} {second.id}"
