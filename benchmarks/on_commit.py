"""What ``on_commit`` costs next to a plain ``apply_async``, in one process.

``python -m benchmarks.on_commit --calls 1000 --rounds 5`` prints JSON: wall microseconds per
call, medians and spread over the rounds, the ways alternating within each round; the CPU
time of the process per call; and for the web ways the CPU time of the loop's thread per
call (what the other requests of that loop wait for). Each call is one unit of work that
ends with a commit and (but for the ``commit_only`` ways) one message:

* web (an ``asyncio.run()`` loop, a new ``AsyncSession`` per call, as a request has):
  ``commit_only``; ``apply_async_then_commit`` (``sig.apply_async()`` on the loop, the
  common pattern); ``on_commit`` (``on_commit(sig, session=...)`` then the commit, which
  publishes from the publisher thread and waits for it).
* body (a task run with ``apply()``, its loop in a loop thread as on the threads pool):
  ``body_commit_only``, ``body_apply_async``, ``body_apply_async_on_commit`` (``on_commit(sig)``).

The commits have nothing to write, so no connection is checked out: the figures are the
publishing path's, not the database's. Needs the broker (``--broker``, Redis by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from async_session_task import AsyncSessionTask, on_commit

QUEUE = "bench-on-commit"  # no worker consumes it; purged after each round

app = Celery("bench_on_commit", broker="redis://127.0.0.1:6379/0", set_as_current=False)
# Never connected to: the commits have nothing to write.
app.conf.async_session_url = "postgresql+asyncpg://bench@127.0.0.1/bench"
app.conf.task_routes = {"bench.target": {"queue": QUEUE}}


@app.task(name="bench.target")
def target(x: int) -> int:
    return x


@app.task(bind=True, base=AsyncSessionTask, name="bench.body")
async def body(self: AsyncSessionTask, way: str) -> None:
    session = self.session
    if way == "body_apply_async":
        target.apply_async((1,))
    elif way == "body_apply_async_on_commit":
        on_commit(target.s(1))
    await session.commit()


#: A way to run ``calls`` calls; returns the loop thread's CPU seconds if it measures them.
Way = Callable[[int], float | None]


def web(way: str) -> Way:
    def run(calls: int) -> float:
        async def main() -> float:
            engine = create_async_engine(app.conf.async_session_url)
            maker = async_sessionmaker(engine)
            cpu = time.thread_time()
            for _ in range(calls):
                async with maker() as session:
                    if way == "on_commit":
                        on_commit(target.s(1), session=session)
                    await session.commit()
                    if way == "apply_async_then_commit":
                        target.apply_async((1,))
            cpu = time.thread_time() - cpu
            await engine.dispose()
            return cpu

        return asyncio.run(main())

    return run


def in_body(way: str) -> Way:
    def run(calls: int) -> None:
        for _ in range(calls):
            body.apply(args=(way,)).get()

    return run


WAYS: dict[str, Way] = {
    "commit_only": web("commit_only"),
    "apply_async_then_commit": web("apply_async_then_commit"),
    "on_commit": web("on_commit"),
    "body_commit_only": in_body("body_commit_only"),
    "body_apply_async": in_body("body_apply_async"),
    "body_apply_async_on_commit": in_body("body_apply_async_on_commit"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    options = parser.parse_args()
    app.conf.broker_url = options.broker
    for way in WAYS.values():  # warm up: connections, first sessions, the loop
        way(50)
    samples: dict[str, list[float]] = {name: [] for name in WAYS}
    loop_cpu: dict[str, list[float]] = {}
    process_cpu: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(options.rounds):
        for name, way in WAYS.items():
            started, process_started = time.perf_counter(), time.process_time()
            cpu = way(options.calls)
            samples[name].append((time.perf_counter() - started) / options.calls * 1e6)
            process = time.process_time() - process_started
            process_cpu[name].append(process / options.calls * 1e6)
            if cpu is not None:
                loop_cpu.setdefault(name, []).append(cpu / options.calls * 1e6)
            with app.connection_for_write() as connection:
                connection.default_channel.queue_purge(QUEUE)
    report: dict[str, Any] = {
        name: {
            "median_us": round(statistics.median(values), 1),
            "min_us": round(min(values), 1),
            "max_us": round(max(values), 1),
        }
        for name, values in samples.items()
    }
    for name, values in process_cpu.items():
        report[name]["cpu_median_us"] = round(statistics.median(values), 1)
    for name, values in loop_cpu.items():
        report[name]["loop_cpu_median_us"] = round(statistics.median(values), 1)
    web_plain = report["apply_async_then_commit"]["median_us"]
    body_plain = report["body_apply_async"]["median_us"]
    report["on_commit_vs_apply_async"] = round(report["on_commit"]["median_us"] / web_plain, 3)
    report["body_on_commit_vs_apply_async"] = round(
        report["body_apply_async_on_commit"]["median_us"] / body_plain, 3
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
