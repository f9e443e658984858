"""The patch of the user's app (docs/internals.md#app-patch), in this process: a body's
``apply_async()`` is made by the thread that waits for the run, not on the loop's thread."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from celery import Celery

from async_session_task import AsyncSessionTask


def test_instrumentation_that_set_send_task_first_keeps_the_forwarding() -> None:
    """Instrumentation wraps ``app.send_task`` before any task is bound: the library's
    forwarding still wraps it, and the publish still happens in the waiting thread."""
    app = Celery(f"instrumented-{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.async_session_url = "sqlite+aiosqlite://"
    publishing_threads: list[int] = []
    send_task = app.send_task

    def instrumented(*args: Any, **kwargs: Any) -> Any:
        publishing_threads.append(threading.get_ident())
        return send_task(*args, **kwargs)

    app.send_task = instrumented

    @app.task(shared=False, name="patched.child")
    def child() -> None:
        pass

    @app.task(bind=True, base=AsyncSessionTask, shared=False, name="patched.parent")
    async def parent(self: AsyncSessionTask) -> str:
        return str(child.apply_async().id)

    parent.apply().get()
    assert publishing_threads == [threading.get_ident()]
