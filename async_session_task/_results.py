"""Waiting for results from async code without blocking its event loop (docs/calling.md).

:func:`aget` reads the result store from a thread, looking again with backoff. With Redis,
where Celery publishes each stored result on a channel named by its key, one subscriber
thread per process (:class:`Subscriber`) listens for every waiter of the process on one
connection and wakes a waiter as its result arrives; the waiter then reads the store. A
waiter first reads the store once its subscription is confirmed, so a result stored in
between is not missed, and it keeps looking with backoff, so a missed message costs
latency, never a result. The thread sleeps on its connection and a wake-up socket: no
polling, no CPU while results are awaited.
With ``rpc://``, whose results are messages rather than stored, ``_replies`` receives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import socket
import threading
import time
from collections import defaultdict
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult, ResultSet

from ._replies import Replies, replies

#: The first pause between two looks at a pending result, doubled up to :data:`POLL_MAX`.
POLL_START = 0.02
POLL_MAX = 1.0
#: The longest pause between two looks when the subscriber wakes the waiter.
SUBSCRIBED_POLL_MAX = 5.0
#: Seconds a waiter waits for its channel's subscription before its first look.
SUBSCRIBED_WAIT = 0.1
#: Seconds the subscriber sleeps when it cannot watch its connection (not connected).
LISTEN = 0.05


class ResultTimeout(CeleryTimeoutError, TimeoutError):  # type: ignore[misc]  # celery is untyped
    """:func:`aget` waited ``timeout`` seconds: Celery's ``TimeoutError``, and Python's."""


class Subscriber(threading.Thread):
    """One Redis pub/sub connection of this process for one result backend: channels are
    subscribed while a waiter waits on them; a message wakes their waiters' loops."""

    def __init__(self, client: Any) -> None:
        super().__init__(name="async_session_task-results", daemon=True)
        # Subscribe confirmations too: a waiter reads the store once its channel is
        # subscribed, so a result stored before is read, and one stored after is announced.
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        self._commands: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        # Written to with each command: the thread sleeps until Redis sends something or a
        # command comes, never polling (no CPU while waiting, no delay for a new waiter).
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        self._woken.setblocking(False)
        self._lock = threading.Lock()
        self._waiters: dict[bytes, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(set)
        )

    def wait_on(
        self, channel: bytes, loop: asyncio.AbstractEventLoop, event: asyncio.Event
    ) -> None:
        with self._lock:
            first = not self._waiters[channel]
            self._waiters[channel].add((loop, event))
        if first:
            self._command("subscribe", channel)
        else:  # subscribed already (or about to be)
            event.set()

    def done(self, channel: bytes, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(channel)
            if waiters is None:
                return
            waiters.discard((loop, event))
            if waiters:
                return
            del self._waiters[channel]
        self._command("unsubscribe", channel)

    def _command(self, name: str, channel: bytes) -> None:
        self._commands.put((name, channel))
        with contextlib.suppress(OSError):  # full: the thread is due to wake anyway
            self._wake.send(b"\0")

    def run(self) -> None:
        while True:
            try:
                self._take()
                self._deliver()
                self._sleep()
            except Exception:  # a broken connection: redis-py reconnects and resubscribes
                # (a subscription lost here costs its waiter latency: it still looks itself)
                time.sleep(0.5)

    def _take(self) -> None:
        """Run the commands that came (the pubsub object is this thread's only)."""
        while True:
            try:
                name, channel = self._commands.get_nowait()
            except queue.Empty:
                return
            getattr(self._pubsub, name)(channel)

    def _deliver(self) -> None:
        """Wake the waiters of every message received so far, without waiting for more."""
        while self._pubsub.subscribed:
            message = self._pubsub.get_message(timeout=0)
            if message is None:
                return
            if message.get("type") in ("message", "subscribe"):
                with self._lock:
                    waiters = list(self._waiters.get(message["channel"], ()))
                for loop, event in waiters:
                    with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
                        loop.call_soon_threadsafe(event.set)

    def _sleep(self) -> None:
        """Until Redis sends something (while subscribed) or a command comes."""
        readable: list[Any] = [self._woken]
        timeout: float | None = None
        if self._pubsub.subscribed:
            sock = getattr(self._pubsub.connection, "_sock", None)  # redis-py's Connection
            if sock is None:  # not connected: look again soon
                timeout = LISTEN
            elif getattr(sock, "pending", lambda: 0)():  # TLS: read, not yet taken
                return
            else:
                readable.append(sock)
        select.select(readable, [], [], timeout)
        with contextlib.suppress(OSError):
            self._woken.recv(4096)


_subscribers: dict[tuple[int, object], Subscriber] = {}
_subscribers_lock = threading.Lock()


def subscriber(backend: Any) -> Subscriber | None:
    """The subscriber of this process for ``backend`` if it is Redis's; None otherwise."""
    client = getattr(backend, "client", None)
    if type(backend).__name__ not in ("RedisBackend", "SentinelBackend") or client is None:
        return None
    # One per process (a forked child starts its own) and Redis server: each thread that sends
    # has a backend object of its own (celery/celery#6416), and the results of all of them
    # are published on the same server.
    key = (os.getpid(), getattr(backend, "url", None) or id(backend))
    with _subscribers_lock:
        found = _subscribers.get(key)
        if found is None:
            found = _subscribers[key] = Subscriber(client)
            found.start()
    return found


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
            doubling up to 1 s; with Redis, woken by the result's message, up to 5 s). Not
            used with ``rpc://``, whose results arrive as messages (``_replies``).

    Raises:
        ResultTimeout: ``timeout`` passed first (a ``TimeoutError`` of Celery and Python).
        Exception: the task's, with ``propagate``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if isinstance(result, GroupResult | ResultSet):
        return [
            await aget(child, timeout=_left(deadline), propagate=propagate, interval=interval)
            for child in result.results
        ]
    drainer = replies(result.backend)
    if drainer is not None:
        return await _replied(drainer, result, deadline, timeout, propagate)
    listening = subscriber(result.backend)
    if listening is None:
        return await _wait(result, deadline, timeout, propagate, interval, None)
    channel = result.backend.get_key_for_task(result.id)
    loop, woken = asyncio.get_running_loop(), asyncio.Event()
    listening.wait_on(channel, loop, woken)
    try:
        # Read the store once the channel is subscribed (or a moment passed regardless):
        # what was stored before is read then, and what is stored after is announced.
        with contextlib.suppress(TimeoutError):
            left = _left(deadline)
            await asyncio.wait_for(
                woken.wait(), SUBSCRIBED_WAIT if left is None else min(SUBSCRIBED_WAIT, left)
            )
        woken.clear()
        return await _wait(result, deadline, timeout, propagate, interval, woken)
    finally:
        listening.done(channel, loop, woken)


async def _wait(
    result: AsyncResult,
    deadline: float | None,
    waited: float | None,
    propagate: bool,
    interval: float | None,
    woken: asyncio.Event | None,
) -> Any:
    pause = interval or POLL_START
    longest = POLL_MAX if woken is None else SUBSCRIBED_POLL_MAX
    while True:
        meta = await asyncio.to_thread(result.backend.get_task_meta, result.id, False)
        state = meta.get("status", states.PENDING)
        if state in states.READY_STATES:
            return _value(result, meta, state, propagate)
        left = _left(deadline)
        if left is not None and left <= 0:
            raise ResultTimeout(f"{result.id}: no result within {waited} s (state {state})")
        wait = pause if left is None else min(pause, left)
        if woken is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), wait)
            woken.clear()
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
