"""This process's place in its worker: the pool, and whether it is the worker's main process.

Recorded by ``worker_init`` (``_worker``); read by the runtime to choose where the loop runs,
and by the worker-start check. The facts about each pool are ``_pools``'.
"""

from __future__ import annotations

import os
import threading

from . import _pools

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
