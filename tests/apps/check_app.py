"""An app of one task for ``async-session check``, configured from the environment.

``AST_CHECK_URL`` and ``AST_CHECK_ENGINE_OPTIONS`` (JSON) set its database;
``AST_CHECK_PGBOUNCER=1`` adds the statement-cache options of transaction pooling, and
``AST_CHECK_LIFESPAN`` names a lifespan below. ``AST_CHECK_SECOND_URL`` adds a second task,
``check.second``, with a URL of its own (and the same engine options);
``AST_CHECK_IDEMPOTENT=1`` an idempotent task, ``check.once``; ``AST_CHECK_OUTBOX=1`` makes
``on_commit`` calls durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from celery import Celery
from sqlalchemy import text

from async_session_task import AsyncSessionTask

options: dict[str, Any] = json.loads(os.environ.get("AST_CHECK_ENGINE_OPTIONS", "{}"))
if os.environ.get("AST_CHECK_PGBOUNCER") == "1":
    options["connect_args"] = {
        **options.get("connect_args", {}),
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
    }

app = Celery("check_app", set_as_current=False)
app.conf.update(
    async_session_url=os.environ.get("AST_CHECK_URL"),
    async_session_engine_options=options,
    async_session_lifespan=os.environ.get("AST_CHECK_LIFESPAN"),
    task_soft_time_limit=float(os.environ.get("AST_CHECK_SOFT_TIME_LIMIT", "0")) or None,
    async_session_outbox=os.environ.get("AST_CHECK_OUTBOX") == "1",
)


@app.task(bind=True, base=AsyncSessionTask, name="check.query")
async def query(self: AsyncSessionTask) -> Any:
    return await self.session.scalar(text("select 1"))


if second_url := os.environ.get("AST_CHECK_SECOND_URL"):

    @app.task(
        bind=True,
        base=AsyncSessionTask,
        name="check.second",
        async_session_url=second_url,
        async_session_engine_options=options,
    )
    async def second(self: AsyncSessionTask) -> Any:
        return await self.session.scalar(text("select 2"))


if os.environ.get("AST_CHECK_IDEMPOTENT") == "1":

    @app.task(bind=True, base=AsyncSessionTask, name="check.once", idempotent=True)
    async def once(self: AsyncSessionTask) -> Any:
        return await self.session.scalar(text("select 3"))


@contextlib.asynccontextmanager
async def lifespan(app: Celery) -> AsyncIterator[dict[str, Any]]:
    yield {"app": app.main}


@contextlib.asynccontextmanager
async def failing_lifespan(app: Celery) -> AsyncIterator[None]:
    if app.main:
        raise ConnectionError(f"{app.main}: the lifespan's service is down")
    yield
