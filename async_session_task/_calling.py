"""Sending tasks and waiting for results from async code, without blocking its event loop
(docs/calling.md): :func:`apublish` (and ``adelay``/``aapply_async`` of a task) hands the
message to a publisher thread (``_publisher``) and awaits it up to a deadline; :func:`aget`
waits for a result by polling the result backend from a thread, with backoff.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery import states
from celery.canvas import Signature
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult, ResultSet
from kombu.exceptions import OperationalError

from . import _config
from ._publisher import Expired, Job, QueueFull, publisher
from ._run import current_run

#: The first pause between two looks at a pending result, doubled up to :data:`POLL_MAX`.
POLL_START = 0.02
POLL_MAX = 1.0


class PublishTimeout(TimeoutError):
    """The message could not be handed to the broker within ``publish_timeout``. It was not
    published if it had not been started by then; one already being sent when the time ran
    out may still reach the broker."""


class ResultTimeout(CeleryTimeoutError, TimeoutError):  # type: ignore[misc]  # celery is untyped
    """:func:`aget` waited ``timeout`` seconds: Celery's ``TimeoutError``, and Python's."""


async def apublish(
    signature: Signature, *, publish_timeout: float | None = None, **options: Any
) -> AsyncResult:
    """Publish ``signature`` (a task's, a chain, a group, a chord) with ``apply_async(**options)``
    and return its result once the broker has the message, without blocking the loop.

    Inside a task body the message is sent through the worker, as ``delay()`` is there.

    Args:
        publish_timeout: seconds to wait for the broker; default: the setting
            ``async_session_publish_timeout`` (10).

    Raises:
        PublishTimeout: the message was not handed over in time, or too many are waiting to
            be (the broker is down).
    """
    if current_run.get() is not None:
        result: AsyncResult = signature.apply_async(**options)
        return result
    timeout = publish_timeout
    if timeout is None:
        timeout = _config.publish_timeout(signature.app.conf)
    job = Job(time.monotonic() + timeout)
    try:
        future = publisher().submit(job, signature.apply_async, **options)
    except QueueFull as exc:
        raise PublishTimeout(str(exc)) from None
    waiting = asyncio.wrap_future(future)
    try:
        return await asyncio.wait_for(asyncio.shield(waiting), timeout)
    except TimeoutError:
        started = not job.abandon()
        waiting.cancel()
        raise PublishTimeout(
            f"{signature.get('task') or type(signature).__name__}: not handed to the broker "
            f"within {timeout} s"
            + (" (its publish had started and may still complete)" if started else "")
        ) from None
    except Expired as exc:
        raise PublishTimeout(str(exc)) from None
    except _connection_errors(signature.app) as exc:
        # The broker refused before the deadline: as much "not handed over" as a timeout.
        raise PublishTimeout(
            f"{signature.get('task') or type(signature).__name__}: the broker refused the "
            f"message ({type(exc).__name__}: {exc})"
        ) from exc
    except asyncio.CancelledError:
        job.abandon()  # not started: never published; started: it completes on its own
        raise


async def aget(
    result: AsyncResult | ResultSet,
    *,
    timeout: float | None = None,  # noqa: ASYNC109  # as AsyncResult.get(timeout=...)
    propagate: bool = True,
    interval: float | None = None,
) -> Any:
    """Wait for ``result`` as ``AsyncResult.get()`` does, without blocking the loop: its value
    (a ``GroupResult``'s: the list of its results).

    Args:
        timeout: seconds to wait at most (None: no limit).
        propagate: re-raise the task's exception (and raise for a revoked task).
        interval: seconds between looks at the result backend (default: from 0.02 s,
            doubling up to 1 s).

    Raises:
        ResultTimeout: ``timeout`` passed first (a ``TimeoutError`` of Celery and Python).
        Exception: the task's, with ``propagate``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if type(result.backend).__name__ == "RPCBackend":
        raise NotImplementedError(
            "aget() polls a result store (Redis, a database, ...); the rpc:// backend keeps "
            "results as messages for the process that sent the task: use result.get() in a "
            "thread of its own, or a result store"
        )
    if isinstance(result, GroupResult | ResultSet):
        return [
            await aget(child, timeout=_left(deadline), propagate=propagate, interval=interval)
            for child in result.results
        ]
    pause = interval or POLL_START
    while True:
        meta = await asyncio.to_thread(result.backend.get_task_meta, result.id, False)
        state = meta.get("status", states.PENDING)
        if state in states.READY_STATES:
            return _value(result, meta, state, propagate)
        left = _left(deadline)
        if left is not None and left <= 0:
            raise ResultTimeout(f"{result.id}: no result within {timeout} s (state {state})")
        await asyncio.sleep(pause if left is None else min(pause, left))
        if interval is None:
            pause = min(POLL_MAX, pause * 2)


def _connection_errors(app: Any) -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker cannot be reached."""
    errors: tuple[type[BaseException], ...] = app.connection_for_write().connection_errors
    return (OSError, OperationalError, *errors)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _value(result: AsyncResult, meta: dict[str, Any], state: str, propagate: bool) -> Any:
    value = meta.get("result")
    if state in states.PROPAGATE_STATES:
        exc = result.backend.exception_to_python(value)
        if state == states.REVOKED and not isinstance(exc, BaseException):
            exc = TaskRevokedError(f"{result.id} was revoked")
        if propagate:
            raise exc
        return exc
    return value
