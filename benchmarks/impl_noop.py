"""Celery alone: a sync task with no database; in the IO-bound workload it only waits."""

from __future__ import annotations

import time

from benchmarks._apps import TASK_NAME, make_app

app = make_app("bench_noop")


@app.task(name=TASK_NAME)
def work(row_id: int, wait: float) -> int:
    if wait:
        time.sleep(wait)
    return 0
