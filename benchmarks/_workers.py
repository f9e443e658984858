"""Workloads (a) and (b): every implementation in a real ``celery worker``, round after round.

The workers of one workload are started side by side, each on a queue of its own. A batch
is published while its worker is not consuming (``cancel_consumer``), then released
(``add_consumer``), so the publisher never limits the worker; while it runs, the other
workers are stopped (SIGSTOP) so that their idle loops do not share the two cores with it
(``--no-pause`` keeps them running, and then counts the CPU they used). Tasks per second
are counted between the first and the last result the worker stored (``date_done``); CPU is
the worker's user + system time over the batch, its main process and its pool children
apart; memory is read from ``/proc`` after it. A worker that connects through PgBouncer
has the pooler's CPU over its batch counted apart, not in the worker's.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from async_session_task.testing import WorkerProcess, worker_process
from benchmarks import _db, _proc
from benchmarks._apps import TASK_NAME, make_app
from benchmarks._pgbouncer import PgBouncer
from benchmarks._stats import Outcome, Sample
from benchmarks._variants import IMPLEMENTATIONS, Implementation

logger = logging.getLogger("benchmarks")


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
        Workload("db-threads", "DB, threads -c 8", "threads", 8, 0.0),
    )
}


class Driver:
    """Publishes batches and collects their results; never subscribes to result channels."""

    def __init__(self, pause: bool = True) -> None:
        # Publishing through an app with a result backend would subscribe to one Redis
        # channel per task (Celery's on_task_call); a separate reader polls the results.
        self.sender: Celery = make_app("bench_driver", backend=False)
        # Each worker's start-up ping holds two pooled broker connections at once (the
        # broadcast's and its producer's): with workers started side by side, Celery's
        # default limit of 10 would let five pings take them all and each wait for another.
        self.sender.conf.broker_pool_limit = 64
        self.reader: Celery = make_app("bench_reader")
        self.pause = pause

    def batch(
        self,
        worker: WorkerProcess,
        impl: Implementation,
        tasks: int,
        wait: float,
        timeout: float,
        *,
        number: int = 0,
        idle: Sequence[int] = (),
        database: str | None = None,
        pooler: int | None = None,
    ) -> tuple[Sample, str | None]:
        """Run one batch on ``worker``; ``idle`` are the pids of the other workers, ``pooler``
        the PgBouncer the worker connects through."""
        control, node = self.sender.control, [worker.nodename]
        control.cancel_consumer(worker.queue, destination=node, reply=True, timeout=10)
        first_row = impl.first_row or 0
        ids = []
        with self.sender.producer_or_acquire() as producer:
            for index in range(tasks):
                result = self.sender.send_task(
                    TASK_NAME, (first_row + index, wait), queue=worker.queue, producer=producer
                )
                ids.append(result.id)
        pid = worker.process.pid
        # Without results, the counters tell when the batch is done: read them before it starts.
        counted = None if impl.store_results else _db.counter_sum(database or "", first_row)
        before_total = None if self.pause else sum(_proc.cpu_seconds(p) for p in idle)
        pooler_before = 0.0 if pooler is None else _proc.cpu_seconds(pooler)
        if self.pause:
            _proc.pause(list(idle), True)
        try:
            cpu = _proc.cpu(pid)
            start = time.perf_counter()
            control.add_consumer(worker.queue, destination=node, reply=True, timeout=10)
            if impl.store_results:
                metas, error = self._results(ids, timeout, worker)
            else:
                assert database is not None
                assert counted is not None
                metas, error = _counted(database, first_row, counted, tasks, timeout, start)
            wall = time.perf_counter() - start
            if not impl.store_results and error is None:
                # The last commit is not the end of the last task: count the CPU of its end
                # too, and do not stop the worker for the next batch before it is done.
                self._settle(worker, timeout)
            elif not impl.store_results and (logged := _last_error(worker.log, "")):
                error = f"{error}; worker log{logged}"
            cpu = _proc.cpu(pid) - cpu
            pooler_cpu = 0.0 if pooler is None else _proc.cpu_seconds(pooler) - pooler_before
        finally:
            if self.pause:
                _proc.pause(list(idle), False)
        idle_cpu = 0.0 if before_total is None else sum(map(_proc.cpu_seconds, idle)) - before_total
        memory = _proc.memory(pid)
        failures = [m for m in metas if m["status"] != "SUCCESS"]
        if failures and error is None:
            first = failures[0]["result"]
            error = f"{len(failures)} of {tasks} tasks failed, e.g. {type(first).__name__}: {first}"
        done = sorted(m["date_done"] for m in metas if m.get("date_done"))
        span = (done[-1] - done[0]).total_seconds() if len(done) > 1 else 0.0
        rate = (len(done) - 1) / span if span > 0 else len(metas) / wall
        count = max(len(metas), 1)
        sample = Sample(
            round=number,
            tasks_per_s=rate,
            cpu_ms_per_task=1000 * cpu.total / count,
            main_cpu_ms_per_task=1000 * cpu.main / count,
            children_cpu_ms_per_task=1000 * cpu.children / count,
            idle_cpu_ms_per_task=1000 * idle_cpu / count,
            pgbouncer_cpu_ms_per_task=1000 * pooler_cpu / count,
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

    def _results(
        self, ids: list[str], timeout: float, worker: WorkerProcess
    ) -> tuple[list[dict[str, Any]], str | None]:
        metas: list[dict[str, Any]] = []
        try:
            for _, meta in self.reader.backend.get_many(ids, timeout=timeout, interval=0.05):
                meta["date_done"] = datetime.fromisoformat(meta["date_done"])
                metas.append(meta)
        except ResultTimeout:
            error = f"timed out after {timeout:.0f} s with {len(metas)} of {len(ids)} tasks done"
            if logged := _last_error(worker.log, "").removeprefix(": "):
                error += f"; worker log: {logged}"
            return metas, error
        return metas, None

    def _settle(self, worker: WorkerProcess, timeout: float) -> None:
        """Wait until ``worker`` runs no task (asked through ``inspect active``)."""
        inspect = self.sender.control.inspect(destination=[worker.nodename], timeout=5)
        deadline = time.monotonic() + timeout
        while any((inspect.active() or {}).values()) and time.monotonic() < deadline:
            pass  # each inspect call is itself a round trip to the worker

    def purge(self, queue: str) -> None:
        with self.sender.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)


def _counted(
    database: str, first_row: int, before: int, tasks: int, timeout: float, start: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Without stored results: wait until the counters from ``first_row``, which summed to
    ``before`` when the batch was published, went up by ``tasks``."""
    deadline = start + timeout
    while (done := _db.counter_sum(database, first_row) - before) < tasks:
        if time.perf_counter() > deadline:
            metas = [{"status": "SUCCESS"}] * done
            return metas, f"timed out after {timeout:.0f} s with {done} of {tasks} tasks done"
        time.sleep(0.02)  # polling PostgreSQL, not waiting for the worker to be ready
    return [{"status": "SUCCESS"}] * tasks, None


@contextlib.contextmanager
def start_workers(
    driver: Driver,
    workload: Workload,
    names: Sequence[str],
    database: str,
    pgbouncer: PgBouncer | None = None,
) -> Iterator[tuple[dict[str, WorkerProcess], dict[str, str]]]:
    """Start one worker per implementation, all at once; yield them and why any did not start."""
    managers = {}
    for name in names:
        impl = IMPLEMENTATIONS[name]
        env = {**impl.env, "AST_BENCH_DATABASE": database}
        if impl.pgbouncer:
            assert pgbouncer is not None, name
            env["AST_BENCH_PGBOUNCER"] = pgbouncer.url
        if not impl.store_results:
            env["AST_BENCH_IGNORE_RESULT"] = "1"
        managers[name] = worker_process(
            driver.sender,
            impl.module,
            pool=workload.pool,
            concurrency=workload.concurrency,
            env=env,
            args=("-l", impl.log_level),
            name=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        )
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


def order(names: Sequence[str], number: int) -> list[str]:
    """Round ``number``'s order: every other round reverses the one before, and each pair of
    rounds starts one place further along, so every pair runs in both orders (AB, BA, ...)
    and each implementation takes every place in turn."""
    shift = (number // 2) % len(names)
    rotated = [*names[shift:], *names[:shift]]
    return rotated[::-1] if number % 2 else rotated


def run_workload(
    driver: Driver,
    workload: Workload,
    names: Sequence[str],
    *,
    rounds: int,
    tasks: int,
    database: str,
    timeout: float,
    pgbouncer: PgBouncer | None = None,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, Outcome]:
    """Run ``rounds`` rounds; each round runs one batch per implementation, but those
    ``skipped`` (name: why), which are reported without being started."""
    skipped = skipped or {}
    outcomes = {name: Outcome(skipped=skipped.get(name)) for name in names}
    started = [name for name in names if name not in skipped]
    _db.reset_counters(database)
    pooler = None if pgbouncer is None else pgbouncer.process.pid
    with start_workers(driver, workload, started, database, pgbouncer) as (workers, errors):
        for name, reason in errors.items():
            outcomes[name].error = reason
        pids = {name: worker.process.pid for name, worker in workers.items()}
        for number in range(rounds):
            for name in order(started, number):
                outcome = outcomes[name]
                if outcome.error is not None:
                    continue
                sample, error = driver.batch(
                    workers[name],
                    IMPLEMENTATIONS[name],
                    tasks,
                    workload.wait,
                    timeout,
                    number=number,
                    idle=[pid for other, pid in pids.items() if other != name],
                    database=database,
                    pooler=pooler if IMPLEMENTATIONS[name].pgbouncer else None,
                )
                outcome.samples.append(sample)
                outcome.sent += tasks
                outcome.succeeded += sample.succeeded
                outcome.error = error
                logger.info(
                    "%s round %d %-24s %7.1f tasks/s %6.2f ms CPU/task%s",
                    workload.name,
                    number + 1,
                    name,
                    sample.tasks_per_s,
                    sample.cpu_ms_per_task,
                    f"  ({error})" if error else "",
                )
    for name in started:
        _check_counters(database, name, outcomes[name])
    return outcomes


def _check_counters(database: str, name: str, outcome: Outcome) -> None:
    """Each success incremented one counter once: the sum must equal the successes."""
    first_row = IMPLEMENTATIONS[name].first_row
    if first_row is not None:
        total = _db.counter_sum(database, first_row)
        ok = total == outcome.succeeded
        outcome.db_check = "ok" if ok else f"counters sum to {total}, {outcome.succeeded} done"


def _last_error(text: str, prefix: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return f"{prefix}: {(errors or lines or [''])[-1]}"[:300]
