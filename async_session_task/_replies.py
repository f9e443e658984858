"""Waiting for results of the ``rpc://`` result backend from async code (docs/calling.md).

That backend stores nothing: the worker sends each result as a message to the reply queue
of the thread that sent the task (Celery's ``app.thread_oid``; the ``AsyncResult`` keeps that
thread's backend object), and a message received there is gone. So the waiting cannot be a
look at a store from any thread: one thread per process and per rpc backend object
(:class:`Replies`) owns that backend's result consumer, the one connection that receives the
replies. A waiter hands it the ``AsyncResult``; the thread registers it with Celery's own
promise (``AsyncResult.then``) and drains the reply queue; the promise wakes the waiter's loop.
A reply that came before its waiter is kept by Celery's buffer of early replies, which the
registration reads first (docs/internals.md#rpc-replies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from celery.result import AsyncResult

from ._process import ThreadsByKey
from ._waiters import settle

logger = logging.getLogger("async_session_task")

#: Seconds one drain of the reply queue waits for a message; new waiters and waiters that
#: gave up are taken in between.
DRAIN = 0.05


class _Waiter:
    """One ``aget()`` of an rpc result; ``settled`` is read and written by the thread only."""

    __slots__ = ("future", "loop", "result", "settled")

    def __init__(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> None:
        self.result = result
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.settled = False


class Replies(threading.Thread):
    """The thread of this process that receives the replies of one rpc backend object."""

    def __init__(self, backend: Any) -> None:
        super().__init__(name="async_session_task-replies", daemon=True)
        self._backend = backend
        self._commands: queue.SimpleQueue[tuple[bool, _Waiter]] = queue.SimpleQueue()
        self._waiting = 0

    def wait_for(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> _Waiter:
        """Register ``result``: the waiter's future is resolved on ``loop`` once it is ready."""
        waiter = _Waiter(result, loop)
        self._commands.put((True, waiter))
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        """The waiter gave up (a timeout, a cancellation): stop waiting for its reply."""
        self._commands.put((False, waiter))

    def run(self) -> None:
        while True:
            try:
                # Idle (nobody waits): sleep until a waiter comes; else take what arrived.
                command: tuple[bool, _Waiter] | None = self._commands.get(block=not self._waiting)
            except queue.Empty:
                command = None
            while command is not None:
                self._take(*command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._waiting:
                self._drain()

    def _take(self, register: bool, waiter: _Waiter) -> None:
        result = waiter.result
        if not register:
            if not waiter.settled:
                waiter.settled = True
                self._waiting -= 1
                self._backend.remove_pending_result(result)
            return
        self._waiting += 1
        if result.on_ready.ready:  # awaited before: then() would call back at once
            self._settle(waiter)
            return
        try:
            # The backend consumes from the reply queue (starting its consumer the first
            # time), or resolves the result from its buffer of early replies at once.
            result.then(lambda _: self._settle(waiter), lambda *_: self._settle(waiter))
        except Exception as exc:  # the broker is unreachable: the waiter learns why
            self._settle(waiter, exc)

    def _settle(self, waiter: _Waiter, error: BaseException | None = None) -> None:
        if waiter.settled:
            return
        waiter.settled = True
        self._waiting -= 1
        with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
            waiter.loop.call_soon_threadsafe(settle, waiter.future, None, error)

    def _drain(self) -> None:
        try:
            self._backend.result_consumer.drain_events(timeout=DRAIN)
        except TimeoutError:
            pass
        except Exception:  # the consumer reconnects on its next drain
            logger.warning("async_session_task: receiving rpc:// replies failed", exc_info=True)
            time.sleep(0.5)


_replies = ThreadsByKey[Replies]()


def replies(backend: Any) -> Replies | None:
    """This process's thread for ``backend`` if it is an rpc backend; None otherwise."""
    if type(backend).__name__ != "RPCBackend":
        return None
    return _replies.get(id(backend), lambda: Replies(backend))
