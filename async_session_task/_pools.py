"""Celery's worker pools as this package needs to know them: their names, which run one body
at a time, how many processes and runs at once a worker of each has, which enforce time
limits themselves. A leaf module (it imports nothing of this package): the worker-start check,
the check command and the runtime read the same facts here.
"""

from __future__ import annotations

#: Pools as ``celery worker -P`` accepts them (``processes`` is another name for prefork).
POOLS = ("prefork", "processes", "solo", "threads", "gevent", "eventlet")
#: The pools whose processes run one body at a time (see :func:`one_at_a_time`).
ONE_AT_A_TIME = ("prefork", "solo")
#: Other names of a pool: an alias of ``-P``, the module of Celery's pool class.
_POOL_ALIASES = {"processes": "prefork", "thread": "threads"}


def pool_name(pool: str) -> str:
    """The pool as ``-P`` spells it, from ``-P``, ``worker_pool``, or the module or import
    path of Celery's pool class (``celery.concurrency.thread:TaskPool`` is ``threads``)."""
    name = pool.split(":")[0].rsplit(".", 1)[-1]
    return _POOL_ALIASES.get(name, name)


def processes_and_runs(pool: str, concurrency: int) -> tuple[int, int]:
    """The processes a worker on ``pool`` with ``-c concurrency`` runs bodies in, and the
    bodies each process runs at once: prefork forks ``concurrency`` children of one run
    each, solo is one process of one run, the others run ``concurrency`` in one process."""
    if pool not in ONE_AT_A_TIME:
        return 1, concurrency
    return (concurrency if pool == "prefork" else 1), 1


def one_at_a_time(pool: str, main_process: bool) -> bool:
    """Whether a process of a worker on ``pool`` runs one body at a time, in its main thread:
    a prefork child (the prefork main process runs none), the one process of solo."""
    return (pool == "prefork" and not main_process) or (pool == "solo" and main_process)


def pool_enforces_limits(pool: str, main_process: bool) -> bool:
    """Whether the pool enforces both time limits itself: a prefork child (SIGUSR1, then
    SIGKILL from the parent)."""
    return pool == "prefork" and not main_process
