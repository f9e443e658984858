"""The core contract on real ``celery worker`` processes, Redis and PostgreSQL (asyncpg)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import group

from tests.apps import maker_app, pg_app
from tests.helpers import (
    StartWorker,
    assert_clean_stop,
    assert_no_open_transaction,
    notes,
    pg_query,
    runtime_stats,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

POOLS = ["prefork", "solo", "threads"]
WAIT = 90


def key() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("pool", POOLS)
def test_one_loop_per_process_reuses_connection_pool(start_worker: StartWorker, pool: str) -> None:
    """500 runs use no more connections than the pool size in each process."""
    with start_worker(pool=pool, concurrency=2, engine_options={"pool_size": 2}) as worker:
        job = group(pg_app.probe.s() for _ in range(500)).apply_async(queue=worker.queue)
        reports: list[dict[str, Any]] = job.get(timeout=WAIT)
        backends: dict[int, set[int]] = {}
        for report in reports:
            backends.setdefault(report["pid"], set()).add(report["backend_pid"])
        assert all(len(pids) <= 2 for pids in backends.values()), backends
        assert len(worker.connections()) <= 2 * len(backends)
        assert_clean_stop(worker)


def test_overlapping_runs_are_isolated(start_worker: StartWorker) -> None:
    """Items 2 and 3: under threads -c 8, every run sees its own session and request."""
    with start_worker(pool="threads", concurrency=8) as worker:
        results = [worker.send(pg_app.probe, 0.2) for _ in range(24)]
        reports = [(r.id, r.get(timeout=WAIT)) for r in results]
        for task_id, report in reports:
            assert report["before"]["id"] == report["after"]["id"] == task_id
            assert report["before"]["session"] == report["after"]["session"]
            assert report["before"]["args"] == report["after"]["args"] == [0.2]
            assert report["current_session_same"]
            assert report["run_sync_request_id"] == task_id
            assert report["routing_key"] == worker.queue
        # Runs overlapped (8 threads, 24 runs of 0.2 s), yet no two shared a session.
        assert len({report["before"]["session"] for _, report in reports}) >= 8
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


@pytest.mark.parametrize("pool", POOLS)
def test_session_ends_on_every_outcome(start_worker: StartWorker, pool: str) -> None:
    """Success, exception, retry, Ignore, Reject, EncodeError: all end the session."""
    with start_worker(pool=pool, concurrency=2) as worker:
        keys = {how: key() for how in ("uncommitted", "commit", "error", "retry", "ignore",
                                       "reject", "unserializable")}  # fmt: skip
        results = {how: worker.send(pg_app.outcome, k, how) for how, k in keys.items()}
        assert results["uncommitted"].get(timeout=WAIT) == "uncommitted"
        assert results["commit"].get(timeout=WAIT) == 1
        assert results["retry"].get(timeout=WAIT) == 2
        with pytest.raises(ValueError, match="failed on purpose"):
            results["error"].get(timeout=WAIT)
        with pytest.raises(Exception, match=r"EncodeError|not JSON serializable"):
            results["unserializable"].get(timeout=WAIT)
        # Ignore and Reject store no result: a probe queued after them proves they ran.
        for _ in range(4):
            worker.send(pg_app.probe).get(timeout=WAIT)
        assert results["ignore"].state in {"PENDING", "IGNORED"}
        for how, k in keys.items():
            expected = ["commit:0"] if how == "commit" else []
            assert notes(worker, k) == expected, how
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


def test_autoretry_for_and_dont_autoretry_for(start_worker: StartWorker) -> None:
    """autoretry_for retries an async body up to max_retries (docs/internals.md#autoretry)."""
    with start_worker(pool="prefork", concurrency=2) as worker:
        retried, not_retried = key(), key()
        first = worker.send(pg_app.flaky, retried, "ValueError")
        second = worker.send(pg_app.flaky, not_retried, "KeyError")
        with pytest.raises(ValueError, match=retried):
            first.get(timeout=WAIT)
        with pytest.raises(KeyError):
            second.get(timeout=WAIT)
        # Every attempt's note was rolled back; the count of attempts is in the log.
        assert notes(worker, retried) == [] == notes(worker, not_retried)
        log = worker.worker.log
        assert log.count(f"Retry in 0s: ValueError('{retried}')") == 2
        assert "Retry in 0s: KeyError" not in log
        assert_clean_stop(worker)


def test_update_state_and_autocommit(start_worker: StartWorker) -> None:
    """update_state from the body; ``autocommit`` commits a successful body."""
    with start_worker(pool="threads", concurrency=4) as worker:
        state = worker.send(pg_app.report_state)
        assert state.get(timeout=WAIT) == state.id
        name = key()
        values = sorted(worker.send(pg_app.bump, name).get(timeout=WAIT) for _ in range(3))
        assert values == [1, 2, 3]
        stored = pg_query(worker.database_url, "select value from counters where name = %s", name)
        assert stored == [(3,)]
        assert_clean_stop(worker)


def test_same_task_id_runs_never_share_a_session(start_worker: StartWorker) -> None:
    """A retry publishes the next run, same id, before this one ends
    (docs/internals.md#same-task-id)."""
    with start_worker(pool="threads", concurrency=8) as worker:
        keys = [key() for _ in range(30)]
        results = [worker.send(pg_app.outcome, k, "retry") for k in keys]
        assert [r.get(timeout=WAIT) for r in results] == [2] * 30
        assert all(notes(worker, k) == [] for k in keys)
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


def test_nested_eager_call_from_a_body(start_worker: StartWorker) -> None:
    """``other.apply()`` inside a body runs on the same loop and pool
    (docs/internals.md#nested-eager)."""
    with start_worker(pool="prefork", concurrency=1) as worker:
        k = key()
        result = worker.send(pg_app.nested, k)
        report = result.get(timeout=WAIT)
        assert report == {"inner": 1, "id": result.id, "notes": 1}
        assert_clean_stop(worker)


def test_app_sessionmaker_connected_before_fork(start_worker: StartWorker) -> None:
    """The app's engine connected in the prefork parent; children work (docs/internals.md#fork)."""
    with start_worker(
        pool="prefork",
        concurrency=2,
        module="tests.apps.maker_app",
        app=maker_app.app,
        env={"AST_WARM_PARENT": "1"},
    ) as worker:
        # The parent never starts a loop (it connected itself, through the app's own code).
        assert runtime_stats(maker_app.app, worker)["loop_running"] is False
        reports = (
            group(maker_app.backend_pid.s() for _ in range(40))
            .apply_async(queue=worker.queue)
            .get(timeout=WAIT)
        )
        assert {r["pid"] for r in reports} <= set(worker.worker.child_pids())
        assert_clean_stop(worker)


def test_prefork_parent_never_starts_a_loop(start_worker: StartWorker) -> None:
    """In a prefork worker only the children run loops and hold connections."""
    with start_worker(pool="prefork", concurrency=2) as worker:
        worker.send(pg_app.probe).get(timeout=WAIT)
        parent = runtime_stats(pg_app.app, worker)
        assert parent["loop_running"] is False
        assert parent["engines"] == 0
        assert parent["pid"] == worker.worker.process.pid
        assert_clean_stop(worker)
