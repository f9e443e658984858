"""The soak's tasks: every way a run can end, each leaving a row only when it should."""

from __future__ import annotations

import asyncio
import json
import os

from celery import Celery
from celery.exceptions import Ignore

from async_session_task import AsyncSessionTask, pgbouncer_engine_options
from tests.faults.app import Entry

_broker = os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("soak_app", broker=_broker, backend=os.environ.get("AST_RESULT_BACKEND", _broker))
_engine_options = json.loads(os.environ.get("AST_ENGINE_OPTIONS", "{}"))
if os.environ.get("AST_PGBOUNCER") == "1":  # tests/faults/test_pgbouncer.py
    _engine_options = pgbouncer_engine_options(**_engine_options)
app.conf.update(
    async_session_url=os.environ.get("AST_DATABASE_URL"),
    async_session_engine_options=_engine_options,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
)

#: How each kind of run ends, and whether its row is committed.
KINDS = {
    "commit": True,  # success
    "read": False,  # success, reads only
    "error": False,  # an exception
    "retry": True,  # self.retry() once, then success
    "ignore": True,  # commits, then raises Ignore (no result is stored)
    "soft_limit": False,  # cancelled by its soft time limit while its transaction is open
}
#: Share of each kind in the mix, per 100 tasks.
MIX = {"commit": 60, "read": 15, "error": 10, "retry": 8, "ignore": 5, "soft_limit": 2}
#: Given per message to "soft_limit" runs only (a slow machine must not fail the others).
SOFT_LIMIT = 0.5


@app.task(
    bind=True,
    base=AsyncSessionTask,
    shared=False,
    max_retries=3,
    default_retry_delay=0,
    time_limit=60,
)
async def soak(self: AsyncSessionTask, key: str, kind: str) -> str:
    self.session.add(Entry(key=key, text=f"{kind}:{self.request.retries}"))
    await self.session.flush()
    if kind == "commit":
        await self.session.commit()
    elif kind == "read":
        await self.session.rollback()
    elif kind == "error":
        raise ValueError(key)
    elif kind == "retry":
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        await self.session.commit()
    elif kind == "ignore":
        await self.session.commit()
        raise Ignore()
    elif kind == "soft_limit":
        await asyncio.sleep(SOFT_LIMIT * 10)
    return kind
