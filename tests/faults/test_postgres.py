"""PostgreSQL goes away: during a run, between runs, and before the worker starts.

Real ``celery worker`` processes, a private PostgreSQL cluster that the tests restart, a
private Redis broker.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from celery import group

from async_session_task import _ping
from tests.faults import app
from tests.faults.services import PrivatePostgres, wait_for
from tests.helpers import FaultWorker, StartFaultWorker

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

WAIT = 60
#: What asyncpg and SQLAlchemy say when the server ends or loses a connection.
CONNECTION_LOST = (
    "terminating connection due to administrator command",
    "connection was closed in the middle of operation",
    "connection is closed",
    "ConnectionDoesNotExistError",
)


def processes(worker: FaultWorker, pool: str) -> set[int]:
    """The pids that run task bodies: the prefork children, or the worker itself."""
    if pool == "prefork":
        return set(worker.worker.child_pids())
    return {worker.worker.process.pid}


def run_batch(worker: FaultWorker, size: int = 20) -> list[Any]:
    """``size`` runs of ``where``; each is its report, or the exception it failed with."""
    job = group(app.where.s() for _ in range(size)).apply_async(queue=worker.worker.queue)
    job.join(timeout=WAIT, propagate=False)
    return [r.result for r in job.results]


def assert_connection_lost(error: Any) -> None:
    assert isinstance(error, Exception), error
    assert any(reason in str(error) for reason in CONNECTION_LOST), repr(error)


def running_statements(worker: FaultWorker) -> list[tuple[Any, ...]]:
    return worker.pg.query(
        "select pid from pg_stat_activity where application_name = %s and state = 'active' "
        "and query like '%%pg_sleep%%'",
        worker.application_name,
    )


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
@pytest.mark.parametrize("pre_ping", [True, False], ids=["pool_pre_ping", "no_pre_ping"])
def test_restart_mid_run(
    start_fault_worker: StartFaultWorker,
    private_postgres: PrivatePostgres,
    pool: str,
    pre_ping: bool,
) -> None:
    """The run in flight fails with the server's reason; the same processes go on serving.

    With ``pool_pre_ping`` no later run sees a stale pooled connection. Without it, each
    connection that was pooled before the restart fails one run, at most (SQLAlchemy then
    invalidates the whole pool); every run after that succeeds.
    """
    options = {"pool_size": 2, "pool_pre_ping": pre_ping}
    with start_fault_worker(pool=pool, concurrency=2, engine_options=options) as worker:
        before = run_batch(worker)
        assert all(isinstance(r, dict) for r in before), before
        pids = processes(worker, pool)
        stale = {r["backend_pid"] for r in before}
        key = uuid.uuid4().hex
        held = worker.send(app.hold, key, 60)
        wait_for(lambda: running_statements(worker), 30, "the held statement")

        private_postgres.restart()

        held.get(timeout=WAIT, propagate=False)
        assert held.state == "FAILURE"
        assert_connection_lost(held.result)
        after = run_batch(worker)
        failed = [r for r in after if not isinstance(r, dict)]
        if pre_ping:
            assert failed == []
        else:
            assert len(failed) <= len(stale), failed
            for error in failed:
                assert_connection_lost(error)
        again = run_batch(worker)
        assert all(isinstance(r, dict) for r in again), again
        served = [r for r in (*after, *again) if isinstance(r, dict)]
        assert {r["pid"] for r in served} <= pids
        assert processes(worker, pool) == pids
        assert not {r["backend_pid"] for r in served} & stale
        assert worker.entries(key) == []  # the held transaction was never committed
        assert not [s for s in worker.connections() if s.startswith("idle in transaction")]
        assert worker.worker.stop() == 0
        assert "still registered at shutdown" not in worker.worker.log


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads", "gevent", "eventlet"])
def test_restart_between_runs_costs_no_run(
    start_fault_worker: StartFaultWorker, private_postgres: PrivatePostgres, pool: str
) -> None:
    """With no engine option set (``pool_pre_ping`` is the library's default), the 20 runs
    after a restart all succeed in the same worker processes, on new server connections
    (docs/internals.md#dead-pooled-connections)."""
    with start_fault_worker(pool=pool, concurrency=2) as worker:
        before = run_batch(worker)
        assert all(isinstance(r, dict) for r in before), before
        pids = processes(worker, pool)
        stale = {r["backend_pid"] for r in before}

        private_postgres.restart()

        after = run_batch(worker)
        assert all(isinstance(r, dict) for r in after), after
        assert {r["pid"] for r in after} <= pids
        assert processes(worker, pool) == pids
        assert not {r["backend_pid"] for r in after} & stale
        assert worker.worker.stop() == 0


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads", "gevent", "eventlet"])
def test_terminated_backends_cost_no_run(start_fault_worker: StartFaultWorker, pool: str) -> None:
    """Every server connection of a worker ended (``pg_terminate_backend``, as an
    administrator or a failover does) a moment after its runs returned them: the next runs
    take the pooled connections within the second in which the library checks them without
    a round trip (docs/internals.md#dead-pooled-connections), find each dead, and all
    succeed on new backends."""
    with start_fault_worker(pool=pool, concurrency=2) as worker:
        before = run_batch(worker)
        assert all(isinstance(r, dict) for r in before), before
        returned = time.monotonic()
        ended = worker.pg.query(
            "select pg_terminate_backend(pid, 5000) from pg_stat_activity "
            "where application_name = %s",
            worker.application_name,
        )
        assert ended, worker.application_name
        assert set(ended) == {(True,)}, ended
        # The premise: the next runs come within the window of the check without a ping.
        assert time.monotonic() - returned < _ping.IDLE_PING_AFTER

        after = run_batch(worker)
        assert all(isinstance(r, dict) for r in after), after
        assert not {r["backend_pid"] for r in after} & {r["backend_pid"] for r in before}
        assert worker.worker.stop() == 0


def test_unreachable_at_worker_start(
    start_fault_worker: StartFaultWorker, private_postgres: PrivatePostgres
) -> None:
    """The worker starts without its database; runs fail with the connection error (or
    retry, where the task says so) and succeed once the database is back."""
    private_postgres.stop()
    try:
        with start_fault_worker(pool="prefork", concurrency=1) as worker:
            failed = worker.send(app.where)
            failed.get(timeout=WAIT, propagate=False)
            assert failed.state == "FAILURE"
            assert isinstance(failed.result, OSError), repr(failed.result)
            assert "Connect call failed" in str(failed.result)
            assert str(private_postgres.port) in str(failed.result)

            key = uuid.uuid4().hex
            retrying = worker.send(app.persistent, key)
            wait_for(lambda: "Retry in" in worker.worker.log, 30, "a retry")
            private_postgres.start()

            retries = retrying.get(timeout=WAIT)
            assert retries >= 1
            # Every attempt but the last failed before writing anything.
            assert worker.entries(key) == [f"try:{retries}"]
            report = worker.send(app.where).get(timeout=WAIT)
            assert report["pid"] in worker.worker.child_pids()
            assert worker.worker.stop() == 0
    finally:
        if not (private_postgres.data / "postmaster.pid").exists():
            private_postgres.start()
