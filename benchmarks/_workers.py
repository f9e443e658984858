"""Workloads (a) and (b): every implementation in a real ``celery worker``, round after round.

The workers of one workload run side by side, each on a queue of its own. A batch is
published while its worker is not consuming (``cancel_consumer``), then released
(``add_consumer``), so the publisher never limits the worker. Tasks per second are counted
between the first and the last result the worker stored (``date_done``); CPU is the worker
process tree's user + system time over the batch; memory is read from ``/proc`` after it.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from async_session_task.testing import WorkerProcess, worker_process
from benchmarks import _db, _proc
from benchmarks._apps import TASK_NAME, make_app

logger = logging.getLogger("benchmarks")

#: name -> (worker module, first row id of its counters; None: it touches no row)
IMPLEMENTATIONS: dict[str, tuple[str, int | None]] = {
    "library": ("benchmarks.impl_library", 1_000_000),
    "sync": ("benchmarks.impl_sync", 2_000_000),
    "naive": ("benchmarks.impl_naive", 3_000_000),
    "noop": ("benchmarks.impl_noop", None),
}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    pool: str
    concurrency: int
    wait: float  #: seconds of simulated outside I/O before the DB work


WORKLOADS = {
    w.name: w
    for w in (
        Workload("db-prefork", "DB, prefork -c 2", "prefork", 2, 0.0),
        Workload("io-threads", "IO-bound, threads -c 32", "threads", 32, 0.02),
        Workload("io-gevent", "IO-bound, gevent -c 100", "gevent", 100, 0.02),
    )
}


@dataclass
class Sample:
    """One batch of one implementation."""

    tasks_per_s: float
    cpu_ms_per_task: float
    peak_rss_mb: float
    pss_mb: float
    wall_s: float
    succeeded: int
    failed: int


@dataclass
class Outcome:
    """Everything one implementation did in one workload."""

    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    succeeded: int = 0
    error: str | None = None  #: why it stopped being measured, if it did
    db_check: str | None = None  #: "ok", or what the counters say instead

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ok" if self.error is None else "failed",
            "error": self.error,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "db_check": self.db_check,
            "rounds": [vars(s) for s in self.samples],
        }
        for metric in ("tasks_per_s", "cpu_ms_per_task", "peak_rss_mb", "pss_mb"):
            values = [getattr(s, metric) for s in self.samples if s.failed == 0]
            if values:
                out[metric] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        return out


class Driver:
    """Publishes batches and collects their results; never subscribes to result channels."""

    def __init__(self) -> None:
        # Publishing through an app with a result backend would subscribe to one Redis
        # channel per task (Celery's on_task_call); a separate reader polls the results.
        self.sender: Celery = make_app("bench_driver", backend=False)
        self.reader: Celery = make_app("bench_reader")

    def batch(
        self, worker: WorkerProcess, tasks: int, wait: float, first_row: int, timeout: float
    ) -> tuple[Sample, str | None]:
        control, node = self.sender.control, [worker.nodename]
        control.cancel_consumer(worker.queue, destination=node, reply=True, timeout=10)
        ids = []
        with self.sender.producer_or_acquire() as producer:
            for index in range(tasks):
                result = self.sender.send_task(
                    TASK_NAME, (first_row + index, wait), queue=worker.queue, producer=producer
                )
                ids.append(result.id)
        pid = worker.process.pid
        cpu = _proc.cpu_seconds(pid)
        start = time.perf_counter()
        control.add_consumer(worker.queue, destination=node, reply=True, timeout=10)
        metas: list[dict[str, Any]] = []
        error = None
        try:
            for _, meta in self.reader.backend.get_many(ids, timeout=timeout, interval=0.05):
                metas.append(meta)
        except ResultTimeout:
            error = f"timed out after {timeout:.0f} s with {len(metas)} of {tasks} tasks done"
            if logged := _last_error(worker.log, "").removeprefix(": "):
                error += f"; worker log: {logged}"
        wall = time.perf_counter() - start
        cpu = _proc.cpu_seconds(pid) - cpu
        memory = _proc.memory(pid)
        failures = [m for m in metas if m["status"] != "SUCCESS"]
        if failures and error is None:
            first = failures[0]["result"]
            error = f"{len(failures)} of {tasks} tasks failed, e.g. {type(first).__name__}: {first}"
        done = sorted(datetime.fromisoformat(m["date_done"]) for m in metas)
        span = (done[-1] - done[0]).total_seconds() if len(done) > 1 else 0.0
        rate = (len(done) - 1) / span if span > 0 else len(done) / wall
        sample = Sample(
            tasks_per_s=rate,
            cpu_ms_per_task=1000 * cpu / max(len(metas), 1),
            peak_rss_mb=memory.peak_rss_mb,
            pss_mb=memory.pss_mb,
            wall_s=wall,
            succeeded=len(metas) - len(failures),
            failed=tasks - len(metas) + len(failures),
        )
        if error is not None:
            if len(metas) < tasks:
                # A worker that stopped answering would also stall its warm shutdown.
                _proc.kill_tree(pid)
            self.purge(worker.queue)
        return sample, error

    def purge(self, queue: str) -> None:
        with self.sender.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)


@contextlib.contextmanager
def start_workers(
    driver: Driver, workload: Workload, names: Sequence[str], database: str
) -> Iterator[tuple[dict[str, WorkerProcess], dict[str, str]]]:
    """Start one worker per implementation, all at once; yield them and why any did not start."""
    managers = {
        name: worker_process(
            driver.sender,
            IMPLEMENTATIONS[name][0],
            pool=workload.pool,
            concurrency=workload.concurrency,
            env={"AST_BENCH_DATABASE": database},
            # Per-task INFO lines would cost every implementation the same CPU and hide
            # the differences being measured.
            args=("-l", "WARNING"),
            name=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        )
        for name in names
    }
    started: dict[str, WorkerProcess] = {}
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        # Started side by side: each start is mostly waiting for imports and a first ping.
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = {name: pool.submit(manager.__enter__) for name, manager in managers.items()}
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except RuntimeError as exc:
                errors[name] = _last_error(str(exc), "worker did not start")
            else:
                stack.push(managers[name].__exit__)
        yield started, errors


def run_workload(
    driver: Driver,
    workload: Workload,
    names: Sequence[str],
    *,
    rounds: int,
    tasks: int,
    database: str,
    timeout: float,
) -> dict[str, Outcome]:
    """Run ``rounds`` rounds; each round runs one batch per implementation, in rotated order."""
    outcomes = {name: Outcome() for name in names}
    _db.reset_counters(database)
    with start_workers(driver, workload, names, database) as (workers, errors):
        for name, reason in errors.items():
            outcomes[name].error = reason
        for number in range(rounds):
            order = [*names[number % len(names) :], *names[: number % len(names)]]
            for name in order:
                outcome = outcomes[name]
                if outcome.error is not None:
                    continue
                first_row = IMPLEMENTATIONS[name][1] or 0
                sample, error = driver.batch(
                    workers[name], tasks, workload.wait, first_row, timeout
                )
                outcome.samples.append(sample)
                outcome.sent += tasks
                outcome.succeeded += sample.succeeded
                outcome.error = error
                logger.info(
                    "%s round %d %-8s %7.1f tasks/s %6.2f ms CPU/task%s",
                    workload.name,
                    number + 1,
                    name,
                    sample.tasks_per_s,
                    sample.cpu_ms_per_task,
                    f"  ({error})" if error else "",
                )
    for name, outcome in outcomes.items():
        _check_counters(database, name, outcome)
    return outcomes


def _check_counters(database: str, name: str, outcome: Outcome) -> None:
    """Each success incremented one counter once: the sum must equal the successes."""
    first_row = IMPLEMENTATIONS[name][1]
    if first_row is not None:
        total = _db.counter_sum(database, first_row)
        ok = total == outcome.succeeded
        outcome.db_check = "ok" if ok else f"counters sum to {total}, {outcome.succeeded} done"


def _last_error(text: str, prefix: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return f"{prefix}: {(errors or lines or [''])[-1]}"[:300]
