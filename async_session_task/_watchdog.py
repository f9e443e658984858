"""Loop-stall watchdog: a warning when something blocks the process's event loop.

Every run of the process shares one loop, so a sync call inside an ``async def`` body
(``time.sleep``, a sync driver, ``requests``, heavy CPU work) delays all of them. A monitor
thread pings the loop (``call_soon_threadsafe``) every ``threshold / 2`` seconds; when a ping
stays unanswered for ``threshold`` seconds while the loop runs, it logs one warning for that
stall, naming the run that holds the loop and the loop thread's stack
(``sys._current_frames``), so the blocking line is in the log. When the loop answers again
it logs how long the stall lasted. A loop that runs per call (prefork children, solo) is
idle between calls, not stuck.

The threshold is the ``async_session_stall_threshold`` setting (seconds; ``0`` turns the
watchdog off). What holds the loop is told by a callable handed in with the loop (the
package's registry of runs, through ``_runtime.hooks``): the loop layer knows no runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from ._waiters import original

logger = logging.getLogger("async_session_task")

#: Innermost frames of the loop thread's stack shown in the warning.
STACK_LIMIT = 12

#: Given the loop's current asyncio task: a name for the task body holding the loop (None:
#: none does), and the frame it waits at when the thread's stack does not show it.
Holder = Callable[["asyncio.Task[Any] | None"], tuple[str | None, FrameType | None]]

_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = (
    weakref.WeakKeyDictionary()
)


class Watchdog:
    """Watches one loop from a real OS thread (not a greenlet: gevent's hub must not be the
    one that notices the stall, and a patched ``time.sleep`` would need a hub of its own)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, threshold: float, holder: Holder | None = None
    ) -> None:
        self.loop = loop
        self.threshold = threshold
        self._holder = holder
        self.stalls = 0
        self._loop_thread: int | None = None
        self._allocate_lock = original("_thread", "allocate_lock")
        self._get_ident = original("_thread", "get_ident")
        self._stop = self._allocate_lock()
        self._stop.acquire()

    def start(self) -> Watchdog:
        # The first ping is sent from here, ahead of anything the caller schedules next
        # (a first run): its answer tells the monitor which thread runs the loop.
        original("_thread", "start_new_thread")(self._watch, (self._ping(),))
        return self

    def _ping(self) -> Any:
        answered = self._allocate_lock()
        answered.acquire()
        self.loop.call_soon_threadsafe(self._answer, answered)
        return answered

    def stop(self) -> None:
        """Let the monitor thread end (it also ends by itself once the loop is closed)."""
        if self._stop.locked():
            self._stop.release()

    def _stopped(self, wait: float = 0.0) -> bool:
        if self._stop.acquire(timeout=wait):
            self._stop.release()
            return True
        return self.loop.is_closed()

    def _watch(self, answered: Any) -> None:
        step = self.threshold / 4
        while True:
            # Only time the loop spends running counts: a loop that runs per call (prefork
            # children, solo) is idle between calls, not stuck, and answers at the next one.
            waited, since = 0.0, None
            while not answered.acquire(timeout=step):
                if self._stopped():
                    return
                waited = waited + step if self.loop.is_running() else 0.0
                if since is None and waited >= self.threshold:
                    since = time.monotonic() - waited
                    self.stalls += 1
                    self._warn()  # once per stall: the next ping waits for this one
            if since is not None:
                logger.info(
                    "The event loop of process %d answers again after %.1f s.",
                    os.getpid(),
                    time.monotonic() - since,
                )
            if self._stopped(self.threshold / 2):
                return
            try:
                answered = self._ping()
            except RuntimeError:  # the loop was closed
                return

    def _answer(self, answered: Any) -> None:  # on the loop
        self._loop_thread = self._get_ident()
        answered.release()

    def _warn(self) -> None:
        # Until the loop answered a first ping, the thread id asyncio recorded in
        # run_forever (a greenlet's id, not the thread's, under gevent's patching).
        thread = self._loop_thread or getattr(self.loop, "_thread_id", None)
        frame = sys._current_frames().get(thread) if thread is not None else None
        task = asyncio.current_task(self.loop)
        name, waits_at = (None, None) if self._holder is None else self._holder(task)
        who = f"task {name}" if name is not None else "code outside any task body"
        logger.warning(
            "The event loop of process %d has not answered for %.1f s: %s blocks it, so every "
            "other run on this loop waits. Await instead of blocking (asyncio.sleep, an "
            "async driver, or asyncio.to_thread for sync calls). The loop is at:\n%s",
            os.getpid(),
            self.threshold,
            who,
            _format(waits_at or frame),
        )


def _format(frame: FrameType | None) -> str:
    if frame is None:
        return "  (stack not available)\n"
    return "".join(traceback.format_stack(frame, limit=STACK_LIMIT))


def watch(
    loop: asyncio.AbstractEventLoop, threshold: float, holder: Holder | None = None
) -> Watchdog | None:
    """Start watching ``loop`` (once per loop; later calls return the same watchdog);
    ``holder`` names what holds it in a warning.

    Returns None when ``threshold`` is 0 (turned off).
    """
    watchdog = _watchdogs.get(loop)
    if watchdog is not None:
        return watchdog
    if threshold <= 0:
        return None
    watchdog = _watchdogs[loop] = Watchdog(loop, threshold, holder).start()
    return watchdog


def unwatch(loop: asyncio.AbstractEventLoop) -> None:
    """Stop watching ``loop``, if it is watched."""
    watchdog = _watchdogs.pop(loop, None)
    if watchdog is not None:
        watchdog.stop()
