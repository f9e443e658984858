"""After its run, a session refuses any use, through any reference to it, and holds nothing
open; and what ``self.session`` says in Celery's hooks is true."""

from __future__ import annotations

import uuid

import pytest

from tests.apps import pg_app
from tests.helpers import StartWorker, assert_clean_stop, assert_no_open_transaction, notes

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

WAIT = 60


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_session_kept_past_its_run_refuses_use(start_worker: StartWorker, pool: str) -> None:
    """A callback holding the run's session adds and flushes, and executes, after the run:
    both are refused, nothing is written, and no connection is left ``idle in transaction``."""
    with start_worker(pool=pool, concurrency=1) as worker:
        key = uuid.uuid4().hex
        assert worker.send(pg_app.keeps_its_session, key).get(timeout=WAIT) == "returned"
        # A prefork child runs its loop only during runs: the callback fires in a later one.
        worker.wait_for(
            lambda: (
                worker.send(pg_app.probe, 0.3).get(timeout=WAIT)
                and f"late {key} execute" in worker.worker.log
            ),
            "the callback never ran",
        )
        log = worker.worker.log
        closed = "InvalidRequestError: This Session has been permanently closed"
        assert f"late {key} add: {closed}" in log, log[-3000:]
        assert f"late {key} execute: {closed}" in log, log[-3000:]
        assert notes(worker, key) == []
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)


def test_hooks_reading_self_session(start_worker: StartWorker) -> None:
    """``before_start`` finds the run's session; ``on_failure`` and ``after_return`` run after
    it was closed and are told so; outside a run the message names where a session exists."""
    with pytest.raises(RuntimeError) as outside:
        pg_app.hooked.session  # noqa: B018  # the property raises
    assert str(outside.value).endswith(
        "or in before_start (the session is closed by the time on_success, on_failure and "
        "after_return run)."
    )
    with start_worker(pool="threads", concurrency=2) as worker:
        succeeded = worker.send(pg_app.hooked, False)
        failed = worker.send(pg_app.hooked, True)
        assert succeeded.get(timeout=WAIT) == "done"
        with pytest.raises(ValueError, match="failed on purpose"):
            failed.get(timeout=WAIT)
        ended = "RuntimeError: The run of tests.apps.pg_app.hooked"
        for result in (succeeded, failed):
            log = worker.wait_for_log(f"hook after_return {result.id}")
            assert f"hook before_start {result.id}: AsyncSession" in log
            assert f"hook after_return {result.id}: {ended}" in log
        assert f"hook on_failure {failed.id}: {ended}" in log
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)
