"""A worker process is SIGKILLed in the middle of a run; the broker restarts.

Celery promises at-least-once delivery (``acks_late``), PostgreSQL atomic transactions: the
killed run's transaction is never committed, and the redelivered run does the work once.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
from celery import group

from tests.faults import app
from tests.faults.services import PrivateRedis, wait_for
from tests.helpers import FaultWorker, StartFaultWorker

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

WAIT = 60


def test_sigkill_mid_run_redelivers_and_commits_once(
    start_fault_worker: StartFaultWorker, tmp_path: Path
) -> None:
    """``acks_late=True, reject_on_worker_lost=True``: the killed child's message is requeued."""
    with start_fault_worker(pool="prefork", concurrency=1) as worker:
        key, marker = uuid.uuid4().hex, tmp_path / "first-run-pid"
        result = worker.send(app.half_done, key, str(marker))
        pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 30, "the first run"))
        # Mid-transaction: its entry is written, not committed, so nobody else sees it.
        assert "idle in transaction" in worker.connections()
        assert worker.entries(key) == []

        os.kill(pid, signal.SIGKILL)

        report = result.get(timeout=WAIT)
        assert report["pid"] != pid
        assert report["entries"] == 1
        # The first run's entry died with its connection; only the redelivered one remains.
        assert worker.entries(key) == ["again"]
        assert not [s for s in worker.connections() if s.startswith("idle in transaction")]
        assert worker.worker.stop() == 0
        log = worker.worker.log
    assert "WorkerLostError" in log or "exited prematurely" in log, log[-3000:]


def answers(worker: FaultWorker) -> bool:
    try:
        return worker.worker.ping(timeout=1.0)
    except app.app.connection_for_write().connection_errors:
        # This process's own pooled broker connection died with the server; the next
        # call makes a new one.
        return False


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_broker_restart(
    start_fault_worker: StartFaultWorker, private_redis: PrivateRedis, pool: str
) -> None:
    """Redis restarts (empty): the same worker reconnects and serves async tasks again."""
    with start_fault_worker(pool=pool, concurrency=2) as worker:
        job = group(app.where.s() for _ in range(10)).apply_async(queue=worker.worker.queue)
        before = {r["pid"] for r in job.get(timeout=WAIT)}

        private_redis.restart()

        wait_for(lambda: answers(worker), WAIT, "the worker to reconnect")
        job = group(app.where.s() for _ in range(10)).apply_async(queue=worker.worker.queue)
        after = {r["pid"] for r in job.get(timeout=WAIT)}
        assert worker.worker.process.poll() is None
        if pool == "prefork":
            assert after <= set(worker.worker.child_pids())
        else:
            assert after == before == {worker.worker.process.pid}
        assert worker.worker.stop() == 0
        assert "still registered at shutdown" not in worker.worker.log
