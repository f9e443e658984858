"""Sending tasks from async code without blocking its event loop (docs/calling.md):
:func:`apublish` (and ``adelay``/``aapply_async`` of a task) hands the message to a publisher
thread (``_publisher``) and awaits it up to a deadline. Waiting for results is ``_results``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery.canvas import Signature
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from . import _config
from ._publisher import Expired, Job, QueueFull, publisher
from ._results import unsubscribed
from ._run import current_run


class PublishTimeout(TimeoutError):
    """The message could not be handed to the broker within ``publish_timeout``. It was not
    published if it had not been started by then; one already being sent when the time ran
    out may still reach the broker."""


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
    loop = asyncio.get_running_loop()
    try:
        waiting = publisher().answer_on(loop, job, _send, signature, options)
    except QueueFull as exc:
        raise PublishTimeout(str(exc)) from None
    try:
        async with asyncio.timeout(timeout):
            return await waiting
    except TimeoutError:
        started = not job.abandon()
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


def _send(signature: Signature, options: dict[str, Any]) -> AsyncResult:
    """In a publisher thread."""
    unsubscribed(signature.app)
    result: AsyncResult = signature.apply_async(**options)
    return result


def _connection_errors(app: Any) -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker cannot be reached."""
    errors: tuple[type[BaseException], ...] = app.connection_for_write().connection_errors
    return (OSError, OperationalError, *errors)
