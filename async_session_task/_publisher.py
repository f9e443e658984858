"""This process's publisher: the threads that send messages for code outside task bodies (a
web app's ``on_commit`` and ``apublish``), so the event loop never does broker I/O.

A few threads, not one: with the broker down each publish waits for its connection attempts
(seconds), and one thread would make every caller wait for all the failures queued before
its own. A bounded queue: when it is full the caller is refused at once instead of waiting
behind a thousand others. Every job has a deadline: a job whose deadline passed (or whose
caller gave up) before a thread took it is not published, and reports why; a job a thread
has started is finished, whatever happens to its caller. Each process has its own (a forked
child starts its own threads), and Celery's client objects stay in these threads
(celery/celery#4670).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ._waiters import settle

T = TypeVar("T")

#: Threads that publish at once.
THREADS = 4
#: Jobs waiting for a thread, at most; one more is refused (:class:`QueueFull`).
QUEUE_SIZE = 1000


class QueueFull(RuntimeError):
    """The publisher already has :data:`QUEUE_SIZE` jobs waiting."""


class Expired(TimeoutError):
    """The job's deadline passed (or its caller gave up) before a thread could start it: it
    was not published."""


class Job:
    """One call for a publisher thread; ``abandon()`` before it starts and it never does."""

    __slots__ = ("_lock", "abandoned", "deadline", "started")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.abandoned = False
        self.started = False
        self._lock = threading.Lock()

    def start(self) -> bool:
        """In the thread: whether to run it (not abandoned, not past its deadline)."""
        with self._lock:
            late = self.deadline is not None and time.monotonic() > self.deadline
            if self.abandoned or late:
                return False
            self.started = True
            return True

    def abandon(self) -> bool:
        """The caller gives up; True if the job had not started (it never will)."""
        with self._lock:
            self.abandoned = True
            return not self.started


class Publisher:
    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=THREADS, thread_name_prefix="async_session_task-publish"
        )
        self._slots = threading.BoundedSemaphore(QUEUE_SIZE + THREADS)

    def submit(
        self, job: Job, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in a publisher thread unless ``job`` expires first
        (the future then raises :class:`Expired`).

        Raises:
            QueueFull: too many jobs are waiting already.
        """
        if not self._slots.acquire(blocking=False):
            raise QueueFull(
                f"{QUEUE_SIZE} messages are already waiting to be published: is the broker down?"
            )

        def run() -> T:
            try:
                if not job.start():
                    raise Expired("not published: its deadline passed before it could start")
                return fn(*args, **kwargs)
            finally:
                self._slots.release()

        try:
            return self._executor.submit(run)
        except BaseException:
            self._slots.release()
            raise

    def answer_on(
        self,
        loop: asyncio.AbstractEventLoop,
        job: Job,
        fn: Callable[..., T],
        *args: Any,
        expired: Callable[[Expired], None] | None = None,
    ) -> asyncio.Future[T]:
        """:meth:`submit`, answered on ``loop``: a future of that loop, resolved from the
        thread. Cancelling it does not cancel the job (``job.abandon()`` does, before it
        starts). Cheaper on the loop than ``asyncio.wrap_future`` of :meth:`submit`, which
        would also cancel the job with it (docs/internals.md#wrap-future-cancels).
        ``expired`` is called in the thread if the job expired before it started, whether or
        not anyone still waits for the answer.

        Raises:
            QueueFull: too many jobs are waiting already.
        """
        waiter: asyncio.Future[T] = loop.create_future()

        def answer(value: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(settle, waiter, value, error)

        def call() -> None:
            try:
                value = fn(*args)
            except BaseException as exc:
                answer(None, exc)
            else:
                answer(value, None)

        def unanswered(done: concurrent.futures.Future[None]) -> None:
            # What call() does not answer: the job expired before it started.
            error = done.exception()
            if error is None:
                return
            if expired is not None and isinstance(error, Expired):
                expired(error)
            answer(None, error)

        self.submit(job, call).add_done_callback(unanswered)
        return waiter


_current: tuple[int, Publisher] | None = None
_lock = threading.Lock()


def publisher() -> Publisher:
    """This process's publisher (a forked child starts its own)."""
    global _current
    current = _current
    if current is None or current[0] != os.getpid():
        with _lock:
            current = _current
            if current is None or current[0] != os.getpid():
                current = _current = (os.getpid(), Publisher())
    return current[1]
