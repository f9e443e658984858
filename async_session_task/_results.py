"""Waiting for results from async code without blocking its event loop (docs/calling.md).

:func:`aget` waits in one of three ways, by the result backend: with Redis, the process's
subscriber (``_subscriber``) reads or receives the result and resolves the waiter; with
``rpc://``, whose results are messages rather than stored, the reply thread of the sending
thread's backend receives it (``_replies``); elsewhere the waiter reads the result store
from a thread, looking again with backoff. With the subscriber the waiter still looks
itself now and then (from 0.5 s, backing off to 5 s), so a lost message costs latency,
never a result.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult, ResultSet

from ._replies import Replies, replies
from ._subscriber import subscriber

#: The first pause between two looks at a pending result, doubled up to :data:`POLL_MAX`.
POLL_START = 0.02
POLL_MAX = 1.0
#: The same where the subscriber looks and listens for the waiter: the waiter's own looks
#: are only a fallback.
SUBSCRIBED_POLL_START = 0.5
SUBSCRIBED_POLL_MAX = 5.0


class ResultTimeout(CeleryTimeoutError, TimeoutError):  # type: ignore[misc]  # celery is untyped
    """:func:`aget` waited ``timeout`` seconds: Celery's ``TimeoutError``, and Python's."""


def unsubscribed(app: Any) -> None:
    """In a publisher thread, before it sends for ``app``: keep this thread's Redis result
    backend from subscribing to each sent task's channel. Celery subscribes at every send so
    that a later ``get()`` in the same thread misses nothing; nothing in a publisher thread
    ever reads that subscription, so each result would be pushed to a connection that is
    never drained, until Redis drops it at its output buffer limit (celery/celery#6963,
    docs/internals.md#send-subscribes). ``get()`` subscribes on its own when called."""
    backend = app.backend  # this thread's own (celery/celery#6416)
    if type(backend).__name__ in ("RedisBackend", "SentinelBackend"):
        vars(backend).setdefault("on_task_call", _no_subscription)


def _no_subscription(producer: Any, task_id: str) -> None:
    """``on_task_call`` of a publisher thread's Redis backend: nothing to prepare."""


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
            doubling up to 1 s; with Redis, where the subscriber reads and listens for the
            waiter, from 0.5 s up to 5 s). Not used with ``rpc://``, whose results arrive
            as messages (``_replies``).

    Raises:
        ResultTimeout: ``timeout`` passed first (a ``TimeoutError`` of Celery and Python).
        Exception: the task's, with ``propagate``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if isinstance(result, GroupResult | ResultSet):
        # Every child waits at once (with Redis: one subscription batch, one MGET); the
        # values, or the first failure, in order, as ResultSet.get() gives them.
        waiting = [
            asyncio.create_task(
                aget(child, timeout=timeout, propagate=propagate, interval=interval)
            )
            for child in result.results
        ]
        try:
            return [await child for child in waiting]
        finally:
            for child in waiting:
                child.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
    drainer = replies(result.backend)
    if drainer is not None:
        return await _replied(drainer, result, deadline, timeout, propagate)
    listening = subscriber(result.backend)
    if listening is None:
        return await _wait(result, deadline, timeout, propagate, interval, None)
    channel = result.backend.get_key_for_task(result.id)
    waiter = listening.wait_on(channel, asyncio.get_running_loop(), result.backend)
    try:
        return await _wait(result, deadline, timeout, propagate, interval, waiter.future)
    finally:
        listening.done(channel, waiter)


async def _wait(
    result: AsyncResult,
    deadline: float | None,
    waited: float | None,
    propagate: bool,
    interval: float | None,
    announced: asyncio.Future[dict[str, Any]] | None,
) -> Any:
    """Until ``result`` is ready: the value; looking at the store with backoff, and, where a
    subscriber announces it, first waiting for that."""
    if announced is None:
        pause, longest = interval or POLL_START, POLL_MAX
        meta = await _read(result)
    else:
        pause, longest = interval or SUBSCRIBED_POLL_START, SUBSCRIBED_POLL_MAX
        meta = {}
    while True:
        state = meta.get("status", states.PENDING)
        if state in states.READY_STATES:
            return _value(result, meta, state, propagate)
        left = _left(deadline)
        if left is not None and left <= 0:
            raise ResultTimeout(f"{result.id}: no result within {waited} s (state {state})")
        wait = pause if left is None else min(pause, left)
        if announced is None:
            await asyncio.sleep(wait)
            meta = await _read(result)
        else:
            # asyncio.wait, not wait_for: a timeout leaves the future to the subscriber.
            done, _ = await asyncio.wait((announced,), timeout=wait)
            meta = announced.result() if done else await _read(result)
        if interval is None:
            pause = min(longest, pause * 2)


async def _replied(
    drainer: Replies,
    result: AsyncResult,
    deadline: float | None,
    waited: float | None,
    propagate: bool,
) -> Any:
    waiter = drainer.wait_for(result, asyncio.get_running_loop())
    try:
        async with asyncio.timeout(_left(deadline)):
            await waiter.future
    except TimeoutError:
        raise ResultTimeout(f"{result.id}: no result within {waited} s") from None
    finally:
        if not waiter.future.done() or waiter.future.cancelled():
            drainer.forget(waiter)
    # Ready: its state and value are cached on the result by the reply, no I/O here.
    return _value(result, {"result": result.result}, result.state, propagate)


async def _read(result: AsyncResult) -> dict[str, Any]:
    meta: dict[str, Any] = await asyncio.to_thread(result.backend.get_task_meta, result.id, False)
    return meta


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
