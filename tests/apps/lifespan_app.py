"""A worker app with a lifespan (an HTTP client and a Redis client shared by its runs) and,
when ``AST_SPANS_FILE`` is set, OpenTelemetry's Celery and SQLAlchemy instrumentations.

Configured from the environment (see ``tests/test_lifespan.py``): ``AST_BROKER_URL``,
``AST_DATABASE_URL``, ``AST_ENGINE_OPTIONS``, ``AST_HTTP_URL`` (a server the test runs),
``AST_REDIS_URL``, ``AST_LIFESPAN`` (``lifespan`` or ``failing_lifespan``) and
``AST_SPANS_FILE`` (where the worker's processes append their finished spans, one JSON object
a line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import redis.asyncio
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from async_session_task import AsyncSessionTask, lifespan_state
from async_session_task.signals import engine_created
from docs.examples.observability import setup_tracing

logger = logging.getLogger(__name__)

app = Celery(
    "lifespan_app",
    broker=os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("AST_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    async_session_url=os.environ.get("AST_DATABASE_URL"),
    async_session_engine_options=json.loads(os.environ.get("AST_ENGINE_OPTIONS", "{}")),
    # An import string, as a settings module would hold it.
    async_session_lifespan=f"tests.apps.lifespan_app:{os.environ.get('AST_LIFESPAN', 'lifespan')}",
    result_expires=600,
    broker_connection_retry_on_startup=True,
)

#: The engines the package made in this process, as ``engine_created`` announced them.
engines: list[AsyncEngine] = []


@contextlib.asynccontextmanager
async def lifespan(app: Celery) -> AsyncIterator[dict[str, Any]]:
    """One HTTP client and one Redis client per worker process, made on its loop."""
    pid = os.getpid()
    async with httpx.AsyncClient(base_url=os.environ["AST_HTTP_URL"]) as http:
        cache = redis.asyncio.Redis.from_url(os.environ.get("AST_REDIS_URL", "redis://127.0.0.1"))
        try:
            logger.warning("lifespan entered in %d", pid)
            yield {"http": http, "redis": cache, "pid": pid}
            # The engines are disposed after this: their pools still hold connections.
            pooled = sum(pooled_connections(engine) for engine in engines)
            await cache.ping()
            logger.warning("lifespan exiting in %d with %d pooled connection(s)", pid, pooled)
        finally:
            await cache.aclose()


def pooled_connections(engine: AsyncEngine) -> int:
    """Connections idle in the engine's pool: ``dispose()`` closes them (and empties it)."""
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedin()


@contextlib.asynccontextmanager
async def failing_lifespan(app: Celery) -> AsyncIterator[dict[str, Any]]:
    """Opens a client, then fails: what it opened is closed by its own ``async with``."""
    async with httpx.AsyncClient(base_url=os.environ["AST_HTTP_URL"]) as http:
        if not http.is_closed:
            raise ConnectionError("the cache is not reachable")
        yield {}


@contextlib.asynccontextmanager
async def stuck_lifespan(app: Celery) -> AsyncIterator[dict[str, Any]]:
    """Its exit never ends on its own: the library cancels it after its grace period."""
    yield {"pid": os.getpid()}
    try:
        await asyncio.Event().wait()
    finally:
        logger.warning("stuck lifespan cancelled in %d", os.getpid())


@engine_created.connect
def on_engine_created(engine: AsyncEngine, **_: Any) -> None:
    engines.append(engine)
    logger.warning("engine created in %d", os.getpid())


class FileSpanExporter(SpanExporter):
    """Appends each finished span to a file shared by the worker's processes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context, parent = span.context, span.parent
            assert context is not None
            record = {
                "name": span.name,
                "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}",
                "parent_id": None if parent is None else f"{parent.span_id:016x}",
                "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
                "pid": os.getpid(),
            }
            lines.append(json.dumps(record) + "\n")
        # One write of a few lines to a file opened for appending: not interleaved with
        # other processes' writes.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(descriptor, "".join(lines).encode())
        finally:
            os.close(descriptor)
        return SpanExportResult.SUCCESS


SPANS_FILE = os.environ.get("AST_SPANS_FILE")
if SPANS_FILE:
    # The recipe of docs/observability.md; spans are written as each one ends.
    setup_tracing(SimpleSpanProcessor(FileSpanExporter(SPANS_FILE)))


def current_trace() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


@app.task(bind=True, base=AsyncSessionTask)
async def shared(
    self: AsyncSessionTask, key: str, delay: float = 0.0, http: bool = True
) -> dict[str, Any]:
    """Uses the lifespan's clients (from the task and from lifespan_state()) and the session;
    ``http=False``: Redis only."""
    state = self.lifespan_state
    status = None
    if http:
        response = await state["http"].get("/slow", params={"delay": delay, "key": key})
        status = response.status_code
    else:
        await asyncio.sleep(delay)
    count = await lifespan_state()["redis"].incr(f"ast-lifespan:{key}")
    # The key in the statement tells this run's SQL spans apart from every other run's.
    selected = await self.session.scalar(text(f"select '{key}'"))
    return {
        "pid": os.getpid(),
        "state_pid": state["pid"],
        "http": id(state["http"]),
        "redis": id(state["redis"]),
        "status": status,
        "count": count,
        "selected": selected,
        "trace": current_trace(),
    }


@app.task(bind=True, base=AsyncSessionTask)
async def state_keys(self: AsyncSessionTask) -> list[str]:
    return sorted(self.lifespan_state)


@app.task(bind=True, base=AsyncSessionTask)
async def inner(self: AsyncSessionTask, key: str) -> dict[str, Any]:
    await self.session.scalar(text(f"select 'inner-{key}'"))
    return {"id": self.request.id, "trace": current_trace()}


@app.task(bind=True, base=AsyncSessionTask)
async def outer(self: AsyncSessionTask, key: str, http: bool = True) -> dict[str, Any]:
    """Calls ``inner`` eagerly from the body, then delays ``shared`` to its own queue."""
    await self.session.scalar(text(f"select 'outer-before-{key}'"))
    nested = inner.apply(args=(key,)).get(disable_sync_subtasks=False)
    await self.session.scalar(text(f"select 'outer-after-{key}'"))
    queue = self.request.delivery_info["routing_key"]
    child = shared.apply_async((f"child-{key}", 0.0, http), queue=queue)
    return {"nested": nested, "child": child.id, "trace": current_trace(), "pid": os.getpid()}
