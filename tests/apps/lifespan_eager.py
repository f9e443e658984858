"""Eager runs of ``tests.apps.lifespan_app`` in a process of their own (``python -m``): the
lifespan is entered at the first run that needs it, exited when the process ends; a test's
substitute state replaces it. Prints one JSON line for ``tests/test_lifespan.py``."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import httpx
from celery import Celery

from async_session_task import AsyncSessionTask, lifespan_state
from async_session_task.testing import override_lifespan_state
from tests.apps import lifespan_app

plain = Celery("plain", set_as_current=False)
plain.conf.update(async_session_url=os.environ["AST_DATABASE_URL"], task_always_eager=True)


@plain.task(bind=True, base=AsyncSessionTask)
async def without_lifespan(self: AsyncSessionTask) -> str:
    try:
        lifespan_state()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


class FakeCache:
    """Stands in for the Redis client in the substitute state."""

    async def incr(self, key: str) -> int:
        return 41


def main() -> None:
    report: dict[str, Any] = {}
    try:
        lifespan_state()
    except RuntimeError as exc:
        report["outside"] = str(exc)
    report["without_lifespan"] = without_lifespan.delay().get()

    # A substitute: the configured lifespan is not entered; the body uses the test's client.
    transport = httpx.MockTransport(lambda request: httpx.Response(418))
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    with override_lifespan_state({"http": http, "redis": FakeCache(), "pid": 0}):
        report["substituted"] = lifespan_app.shared.apply(args=(uuid.uuid4().hex,)).get()
    # The real one: entered at the first eager run, shared by the next (task_always_eager).
    report["apply"] = lifespan_app.shared.apply(args=(uuid.uuid4().hex,)).get()
    lifespan_app.app.conf.task_always_eager = True
    report["delay"] = lifespan_app.shared.delay(uuid.uuid4().hex).get()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
