"""This process's place in its worker: the pool, and whether it is the worker's main process;
and the service threads this process started (:class:`ThreadsByKey`).

Recorded by ``worker_init`` (``_worker``); read by the runtime to choose where the loop runs,
and by the worker-start check. The facts about each pool are ``_pools``'.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from . import _pools

T = TypeVar("T", bound=threading.Thread)

#: The worker of this process tree: its pool's name and the pid of its main process, set
#: by ``worker_init`` (sent once, in the main process, before prefork children are forked).
_worker: tuple[str, int] | None = None


def set_worker_pool(pool: str, main_pid: int) -> None:
    """Record the worker's pool (``prefork``, ``solo``, ``threads``, ``gevent``, ...)."""
    global _worker
    _worker = (pool, main_pid)


def worker_pool() -> str | None:
    """The pool of the worker this process belongs to; None outside a worker."""
    return None if _worker is None else _worker[0]


def loop_placement() -> tuple[bool, bool]:
    """For the calling thread: (it runs the loop inline, the pool enforces the time limits).

    Inline: a prefork child or a solo worker, one task at a time in the main thread."""
    if _worker is None:
        return False, False
    pool, main = _worker[0], os.getpid() == _worker[1]
    inline = (
        _pools.one_at_a_time(pool, main) and threading.current_thread() is threading.main_thread()
    )
    return inline, _pools.pool_enforces_limits(pool, main)


class ThreadsByKey(Generic[T]):
    """Service threads of this process, one per key, made and started on first use. A forked
    child inherits the dict but not the threads: the key carries the pid, so it starts its
    own."""

    def __init__(self) -> None:
        self._threads: dict[tuple[int, object], T] = {}
        self._lock = threading.Lock()

    def get(self, key: object, make: Callable[[], T]) -> T:
        with self._lock:
            found = self._threads.get((os.getpid(), key))
            if found is None:
                found = self._threads[os.getpid(), key] = make()
                found.start()
        return found
