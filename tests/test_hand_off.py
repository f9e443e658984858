"""Publishing from sync code inside ``session.run_sync()``, on the pools whose worker waits in
a thread or greenlet apart from the loop: the call is handed to the worker, as from the body
(docs/internals.md#publish-from-spawned-task)."""

from __future__ import annotations

import pytest

from tests.apps import pg_app
from tests.helpers import StartWorker, assert_clean_stop, assert_no_open_transaction

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

WAIT = 60
#: gevent lost about one run in ten before the hand-off worked from there: enough runs that
#: every one of them would have to be lucky.
RUNS = 40


@pytest.mark.parametrize("pool", ["eventlet", "gevent", "threads"])
def test_publish_and_join_from_run_sync(start_worker: StartWorker, pool: str) -> None:
    """``apply_async()``, a chain, a group (not on eventlet, docs/faq.md), ``update_state()``
    and ``AsyncResult.get()`` from the function given to ``run_sync()``: every run returns,
    its children know their parent, and the worker goes on serving."""
    with start_worker(pool=pool, concurrency=8) as worker:
        for _ in range(RUNS // 4):
            # Four at a time: each joins its child, which needs a free slot of the worker.
            parents = [
                worker.send(pg_app.publishes_in_run_sync, pool != "eventlet") for _ in "abcd"
            ]
            for parent in parents:
                report = parent.get(timeout=WAIT)
                assert report["child_parent"] == parent.id
                assert len(report["published"]) == (2 if pool == "eventlet" else 4)
        assert "Cannot switch to a different thread" not in worker.worker.log
        assert worker.send(pg_app.probe).get(timeout=WAIT)["current_session_same"]
        assert_no_open_transaction(worker)
        assert_clean_stop(worker)
