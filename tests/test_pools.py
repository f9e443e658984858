"""The pool matrix: every stock pool on Redis and on RabbitMQ, with time limits and revoke."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import group

from tests.apps import pg_app
from tests.helpers import (
    ServiceWorker,
    StartWorker,
    assert_clean_stop,
    assert_no_open_transaction,
    notes,
    pg_query,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

POOLS = ["prefork", "solo", "threads", "gevent", "eventlet"]
WAIT = 90


def key() -> str:
    return uuid.uuid4().hex


def concurrency_of(pool: str) -> int:
    return {"prefork": 2, "solo": 1, "threads": 4}.get(pool, 10)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.parametrize("pool", POOLS)
def test_pool_matrix(start_worker: StartWorker, pool: str, broker: str) -> None:
    """Isolation, request, retries, every outcome's cleanup, publishing from a body, and a
    clean shutdown, on each pool and broker."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool), broker=broker) as worker:
        probes = [worker.send(pg_app.probe, 0.05) for _ in range(12)]
        for result in probes:
            report = result.get(timeout=WAIT)
            assert report["before"]["id"] == report["after"]["id"] == result.id
            assert report["before"]["session"] == report["after"]["session"]
            assert report["run_sync_request_id"] == result.id
        keys = {how: key() for how in ("commit", "error", "retry", "ignore", "reject")}
        outcomes = {how: worker.send(pg_app.outcome, k, how) for how, k in keys.items()}
        assert outcomes["commit"].get(timeout=WAIT) == 1
        assert outcomes["retry"].get(timeout=WAIT) == 2
        with pytest.raises(ValueError, match="failed on purpose"):
            outcomes["error"].get(timeout=WAIT)
        retried = key()
        with pytest.raises(ValueError, match=retried):
            worker.send(pg_app.flaky, retried).get(timeout=WAIT)
        # A body that publishes tasks and updates its state: the worker's thread does it,
        # so the children know their parent.
        parent = worker.send(pg_app.fan_out, 3)
        for child in parent.get(timeout=WAIT):
            report = worker.worker.app.AsyncResult(child).get(timeout=WAIT)
            assert report["before"]["id"] == child
            assert report["parent_id"] == parent.id
        worker.send(pg_app.probe).get(timeout=WAIT)  # Ignore/Reject have run by now
        for how, k in keys.items():
            assert notes(worker, k) == (["commit:0"] if how == "commit" else []), how
        assert notes(worker, retried) == []
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


@pytest.mark.parametrize("pool", POOLS)
def test_soft_time_limit_cancels_and_rolls_back(start_worker: StartWorker, pool: str) -> None:
    """The body is cancelled at its await, its finally runs, its work is rolled back; Celery
    sees SoftTimeLimitExceeded; the same process then serves the next task
    (docs/internals.md#soft-limit-prefork)."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as worker:
        k = key()
        result = worker.send(pg_app.sleepy, k, 30)
        with pytest.raises(SoftTimeLimitExceeded):
            result.get(timeout=WAIT)
        assert notes(worker, k) == []
        log = worker.worker.log
        assert f"sleepy {k}: cancelled at its await" in log
        assert f"sleepy {k}: finally ran" in log
        after = [worker.send(pg_app.probe).get(timeout=WAIT) for _ in range(4)]
        assert all(report["current_session_same"] for report in after)
        assert "another operation is in progress" not in worker.worker.log
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


@pytest.mark.parametrize("pool", ["threads", "solo", "eventlet"])
def test_hard_time_limit_on_pools_without_one(start_worker: StartWorker, pool: str) -> None:
    """A body that swallows cancellation is reported at its hard limit, not waited for."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as worker:
        k = key()
        with pytest.raises(TimeLimitExceeded):
            worker.send(pg_app.stubborn, k, 12).get(timeout=WAIT)
        assert "pg_app.stubborn: its cancelled body is still running" in worker.worker.log
        assert worker.send(pg_app.probe).get(timeout=WAIT)["current_session_same"]
        assert_clean_stop(worker)


def test_hard_time_limit_on_gevent_cancels_the_body(start_worker: StartWorker) -> None:
    """gevent's own hard limit (a gevent.Timeout in the waiting greenlet): the coroutine on
    the loop is cancelled too, its finally runs and its work is rolled back, so nothing runs
    on for a task Celery considers finished."""
    with start_worker(pool="gevent", concurrency=concurrency_of("gevent")) as worker:
        k = key()
        with pytest.raises(TimeLimitExceeded):
            worker.send(pg_app.sleepy, k, 30, soft_time_limit=60, time_limit=2).get(timeout=WAIT)
        worker.wait_for_log(f"sleepy {k}: finally ran")
        assert f"sleepy {k}: cancelled at its await" in worker.worker.log
        assert notes(worker, k) == []
        assert worker.send(pg_app.probe).get(timeout=WAIT)["current_session_same"]
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


def test_hard_time_limit_on_prefork_replaces_the_child(start_worker: StartWorker) -> None:
    """The child is killed; the parent's after_return has no session and copes
    (docs/internals.md#hard-limit-in-parent)."""
    with start_worker(pool="prefork", concurrency=1) as worker:
        first_child = worker.worker.child_pids()
        k = key()
        with pytest.raises(TimeLimitExceeded):
            worker.send(pg_app.stubborn, k, 30).get(timeout=WAIT)
        report = worker.send(pg_app.probe).get(timeout=WAIT)
        assert report["pid"] not in first_child
        assert notes(worker, k) == []
        assert "after_return handler raised" not in worker.worker.log
        assert_clean_stop(worker)


@pytest.mark.parametrize("pool", ["prefork", "gevent", "eventlet"])
def test_revoke_terminate_stops_the_body(start_worker: StartWorker, pool: str) -> None:
    """revoke(terminate=True): prefork kills the child; gevent/eventlet kill the greenlet,
    and the library cancels the coroutine and rolls its transaction back."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as worker:
        k = key()
        result = worker.send(pg_app.sleepy, k, 30, soft_time_limit=60)
        wait_until_started(worker, k)
        # Until the worker lists the run as active. A prefork parent learns that a child
        # accepted a job a moment after the child starts it; a revoke that arrives before
        # marks the task revoked without killing the child (seen: the warm shutdown at the
        # end then waited for the whole 30 s run).
        worker.wait_for(lambda: result.id in active_ids(worker), f"{k} never listed active")
        worker.worker.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
        with pytest.raises(Exception, match=r"(?i)revoked|terminated|SIGKILL"):
            result.get(timeout=WAIT)
        assert worker.send(pg_app.probe).get(timeout=WAIT)["current_session_same"]
        assert notes(worker, k) == []
        if pool != "prefork":
            # The revoked state is stored before the greenlet is killed: wait for the body.
            worker.wait_for_log(f"sleepy {k}: finally ran")
            assert f"sleepy {k}: cancelled at its await" in worker.worker.log
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


def wait_until_started(worker: ServiceWorker, k: str) -> None:
    """Until ``sleepy`` holds its open transaction and waits in its try block. (An open
    transaction alone is not enough: the body may still be inside ``flush()``, and a
    cancellation there ends it before its try block, so its ``finally`` never logs.)"""
    worker.wait_for_log(f"sleepy {k}: sleeping")
    assert "idle in transaction" in worker.connections()


def test_max_tasks_per_child_leaves_no_connections(
    start_worker: StartWorker, database_url: str
) -> None:
    """Recycled children dispose their engines; new children get a fresh loop and engine."""
    with start_worker(pool="prefork", concurrency=2, args=("--max-tasks-per-child", "5")) as w:
        before = abandoned_sessions(database_url)
        reports: list[dict[str, Any]] = (
            group(pg_app.probe.s() for _ in range(40)).apply_async(queue=w.queue).get(timeout=WAIT)
        )
        assert len({report["pid"] for report in reports}) >= 8
        # Only live children may hold connections: at most one each.
        assert len(w.connections()) <= 2
        assert_clean_stop(w)
        assert abandoned_sessions(database_url) == before


def test_autoscale_shrink_leaves_no_connections(
    start_worker: StartWorker, database_url: str
) -> None:
    """Children stopped by --autoscale dispose their engines: the remaining child holds at
    most one connection, and no session ends without its client closing it."""
    # The autoscaler shrinks a pool idle for AUTOSCALE_KEEPALIVE seconds (default 30).
    env = {"AUTOSCALE_KEEPALIVE": "2"}
    with start_worker(pool="prefork", args=("--autoscale=4,1",), env=env) as w:
        before = abandoned_sessions(database_url)
        results = [w.send(pg_app.probe, 1.0) for _ in range(8)]
        reports = [result.get(timeout=WAIT) for result in results]
        # A prefork child runs one body at a time: runs in flight together prove the growth.
        assert peak_overlap(reports) > 1
        w.wait_for(lambda: len(w.worker.child_pids()) == 1, "the pool never shrank")
        assert len(w.connections()) <= 1
        assert abandoned_sessions(database_url) == before
        assert_clean_stop(w)
        assert abandoned_sessions(database_url) == before


def abandoned_sessions(database_url: str) -> int:
    """Sessions whose client went away without closing them, as a child that exits without
    disposing its engine leaves: the kernel closes its sockets, so pg_stat_activity alone
    would not tell. A backend is counted before it leaves pg_stat_activity."""
    rows = pg_query(
        database_url,
        "select sessions_abandoned from pg_stat_database where datname = current_database()",
    )
    return int(rows[0][0])


def test_threads_pool_warns_when_engine_pool_is_too_small(start_worker: StartWorker) -> None:
    with start_worker(
        pool="threads", concurrency=8, engine_options={"pool_size": 2, "max_overflow": 1}
    ) as worker:
        assert worker.send(pg_app.probe).get(timeout=WAIT)["current_session_same"]
        log = worker.worker.log
        assert log.count("connection pool holds at most 3 connections") == 1
        assert_clean_stop(worker)


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_warm_shutdown_lets_running_bodies_finish(start_worker: StartWorker, pool: str) -> None:
    """SIGTERM: the running body completes, then engines are disposed and the loop closed."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as worker:
        k = key()
        result = worker.send(pg_app.sleepy, k, 2, soft_time_limit=60)
        wait_until_started(worker, k)
        assert_clean_stop(worker)
        assert result.get(timeout=WAIT) == "woke"


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_greenlets_keep_running_while_bodies_wait(start_worker: StartWorker, pool: str) -> None:
    """A waiting greenlet never blocks the hub (docs/internals.md#monkey-patched-threads).
    While one body waits 2 s on PostgreSQL, 50 short runs complete; 100 bodies that each
    await 1 s all run at once."""
    # 30 connections, not one per run: the bodies overlap in their awaits, not in PostgreSQL,
    # whose max_connections (100 by default) other clients share (docs/deployment.md).
    with start_worker(
        pool=pool, concurrency=100, engine_options={"pool_size": 20, "max_overflow": 10}
    ) as worker:
        sleeper = worker.send(pg_app.pg_sleeper, 2)
        wait_until_active(worker)
        short = [worker.send(pg_app.probe) for _ in range(50)]
        short_reports = [result.get(timeout=WAIT) for result in short]
        slow = sleeper.get(timeout=WAIT)
        assert max(report["ended"] for report in short_reports) < slow["ended"]
        overlapping = [worker.send(pg_app.probe, 2.0) for _ in range(100)]
        reports = [result.get(timeout=WAIT) for result in overlapping]
        # Run one at a time they would never overlap; waiting cooperatively, most are in
        # flight together, each with its own session and request.
        assert peak_overlap(reports) >= 50
        assert all(r["before"]["id"] == r["after"]["id"] for r in reports)
        assert_clean_stop(worker)


def peak_overlap(reports: list[dict[str, Any]]) -> int:
    """The most runs in flight at one instant (from their start and end times)."""
    events = sorted(
        [(r["started"], 1) for r in reports] + [(r["ended"], -1) for r in reports],
        key=lambda event: (event[0], event[1]),
    )
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def active_ids(worker: ServiceWorker) -> set[str]:
    """Ids of the runs the worker reports as active (``celery inspect active``)."""
    inspect = worker.worker.app.control.inspect([worker.worker.nodename], timeout=1)
    replies = inspect.active() or {}
    return {request["id"] for requests in replies.values() for request in requests}


def wait_until_active(worker: ServiceWorker) -> None:
    """Until one of the worker's connections is running a statement."""
    worker.wait_for(lambda: "active" in worker.connections(), "no statement became active")
