"""A run owns what it starts: regressions found by using the library as a demanding user would.

Each scenario runs on real workers (Redis, PostgreSQL through asyncpg) on the pools where it
went wrong; docs/internals.md names the behaviour behind each.
"""

from __future__ import annotations

import uuid

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from tests.apps import pg_app
from tests.helpers import StartWorker, assert_no_open_transaction, notes

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

POOLS = ["prefork", "solo", "threads", "gevent", "eventlet"]
WAIT = 60


def concurrency_of(pool: str) -> int:
    return {"prefork": 2, "solo": 1, "threads": 4}.get(pool, 10)


@pytest.mark.parametrize("pool", POOLS)
def test_gather_on_the_run_session_fails_with_sqlalchemys_error(
    start_worker: StartWorker, pool: str
) -> None:
    """docs/internals.md#gather-on-session: the task fails with SQLAlchemy's own error (not
    IllegalStateChangeError from the library's close), the coroutines the run left behind
    are ended before the session closes, and no connection stays in a transaction. With a
    pool of 4 and pre-ping, the old behaviour exhausted the pool after four such runs."""
    options = {"pool_size": 4, "max_overflow": 0, "pool_pre_ping": True, "pool_timeout": 10}
    with start_worker(pool=pool, concurrency=concurrency_of(pool), engine_options=options) as w:
        for _ in range(6):
            result = w.send(pg_app.gather_on_session, 4)
            with pytest.raises(Exception) as raised:  # noqa: PT011  # checked below
                result.get(timeout=WAIT)
            message = f"{type(raised.value).__name__}: {raised.value}"
            assert "concurrent operations are not permitted" in message, message
            assert "IllegalStateChangeError" not in message, message
        # The pool still hands out connections: none is pinned by a left-behind coroutine.
        report = w.send(pg_app.probe).get(timeout=WAIT)
        assert report["backend_pid"] > 0
        assert_no_open_transaction(w)
        assert "IllegalStateChangeError" not in w.worker.log


@pytest.mark.parametrize("pool", ["threads", "gevent", "eventlet"])
@pytest.mark.parametrize("how", ["SystemExit", "KeyboardInterrupt"])
def test_a_base_exception_in_a_body_never_stops_the_loop(
    start_worker: StartWorker, pool: str, how: str
) -> None:
    """docs/internals.md#base-exception-in-body: the exception is raised in the worker's
    thread or greenlet as a sync task's would be; the loop keeps serving the next runs."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as w:
        failed = w.send(pg_app.exits, how)
        # Celery's tracer lets a BaseException through; the pool, not the task, sees it.
        # What matters: later runs are served by the same process and loop.
        for _ in range(5):
            probe = w.send(pg_app.probe)
            assert probe.get(timeout=WAIT)["after"]["id"] == probe.id
        assert failed.state != "SUCCESS"
        assert "stopped unexpectedly" not in w.worker.log


@pytest.mark.parametrize("pool", POOLS)
def test_coroutines_the_body_starts_publish_and_use_anyio(
    start_worker: StartWorker, pool: str
) -> None:
    """docs/internals.md#publish-from-spawned-task: gather, TaskGroup and create_task publish
    through the worker, with the run as parent; a plain delay() and a group from the body
    still work (a group's producer is taken in the worker, not on the loop's thread).
    anyio's task groups, to_thread and cancel scopes work in a body on every pool."""
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as w:
        # eventlet's patched threading cannot start a thread from the loop's OS thread.
        to_thread = pool != "eventlet"
        report = w.send(pg_app.uses_anyio, to_thread).get(timeout=WAIT)
        assert report["seen"] == [report["id"]] * 3
        assert report["off_loop"] is to_thread
        assert report["moved_on"] is True
        for _ in range(2):
            # A group also reaches the result backend from the loop's thread (it waits on
            # its results there): not on eventlet, whose green sockets belong to its hub.
            parent = w.send(pg_app.publish_from_spawned, pool != "eventlet")
            children = parent.get(timeout=WAIT)
            assert len(children["spawned"]) == 5
            assert len(children["body"]) == (1 if pool == "eventlet" else 4)
            for child in [*children["spawned"], *children["body"]]:
                report = w.worker.app.AsyncResult(child).get(timeout=WAIT)
                assert report["parent_id"] == parent.id
        assert "Cannot switch to a different thread" not in w.worker.log


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_coroutines_left_behind_are_ended_with_the_run(
    start_worker: StartWorker, pool: str
) -> None:
    """docs/internals.md#outliving-tasks: the run warns naming the task, cancels what it left
    behind, and its session refuses to be used from then on; nothing is written late."""
    key = uuid.uuid4().hex
    with start_worker(pool=pool, concurrency=concurrency_of(pool)) as w:
        result = w.send(pg_app.leaves_work_behind, key)
        assert result.get(timeout=WAIT) == "returned"
        log = w.wait_for_log(f"background {key}: The run of")
        assert f"tests.apps.pg_app.leaves_work_behind[{result.id}]" in log
        assert "ended with 1 asyncio task(s) it started still running" in log
        assert "open a session of its own" in log
        assert notes(w, key) == []
        assert_no_open_transaction(w)


def test_a_tasks_own_maker_overrides_the_apps_url(start_worker: StartWorker) -> None:
    """The task's async_session_maker is chosen as a unit with its (unset) URL: the app's
    async_session_url does not make every run fail."""
    with start_worker(pool="threads", concurrency=2) as w:
        assert w.send(pg_app.on_second_database).get(timeout=WAIT) == "ast-second-database"
        probe = w.send(pg_app.probe)
        assert probe.get(timeout=WAIT)["after"]["id"] == probe.id


@pytest.mark.parametrize("pool", ["threads", "gevent", "prefork"])
def test_joining_a_subtask_leaves_the_loop_free(start_worker: StartWorker, pool: str) -> None:
    """docs/internals.md#join-subtask: get() from a body is waited for by the worker's thread
    or greenlet, so the loop (and a subtask running in the same process) goes on."""
    with start_worker(pool=pool, concurrency=4 if pool != "prefork" else 2) as w:
        try:
            report = w.send(pg_app.joins_subtask).get(timeout=WAIT)
        except CeleryTimeoutError:  # pragma: no cover  # the failure this test exists for
            pytest.fail(f"the join froze the loop:\n{w.worker.log[-3000:]}")
        assert report["child_parent"] == report["id"]
