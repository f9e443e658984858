"""What sending from async code costs, and how long it holds the event loop.

``python -m benchmarks.calling --calls 500 --rounds 5`` prints JSON:

* per call, one after the other on an ``asyncio.run()`` loop: ``delay()`` called on the loop
  against ``await adelay()``: wall and loop-thread CPU microseconds, alternating in each
  round; medians and spread;
* the loop's longest stall (a ticker every 1 ms) while 200 requests send at once, each with
  ``delay()`` and each with ``adelay()``.

Needs Redis (``--broker``); the messages go to a queue no worker consumes, purged after each
round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from celery import Celery

from async_session_task import AsyncSessionTask
from benchmarks._stats import spread

QUEUE = "bench-calling"
app = Celery("bench_calling", broker="redis://127.0.0.1:6379/0", set_as_current=False)
app.conf.task_routes = {"bench.calling": {"queue": QUEUE}}
app.conf.async_session_url = "sqlite+aiosqlite://"  # never connected to


@app.task(name="bench.calling", base=AsyncSessionTask)
async def target(n: int) -> int:
    return n


async def sequential(calls: int, send: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(calls):
        await send(i)
    return time.perf_counter() - wall, time.thread_time() - cpu


async def concurrent(requests: int, send: Callable[[int], Awaitable[Any]]) -> float:
    """The loop's longest stall (s) while ``requests`` sends run at once."""
    longest, last, running = 0.0, time.perf_counter(), True

    async def tick() -> None:
        nonlocal longest, last
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    await asyncio.gather(*(send(i) for i in range(requests)))
    running = False
    await ticker
    return longest


async def blocking(i: int) -> Any:
    return target.delay(i)  # on the loop: the broker round trip blocks it


async def cooperative(i: int) -> Any:
    return await target.adelay(i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    options = parser.parse_args()
    app.conf.broker_url = options.broker
    ways = {"delay": blocking, "adelay": cooperative}
    samples: dict[str, list[float]] = {}
    for round_ in range(options.rounds + 1):  # the first round warms up
        for name, send in ways.items():
            wall, cpu = asyncio.run(sequential(options.calls, send))
            stall = asyncio.run(concurrent(options.requests, send))
            if round_:
                samples.setdefault(f"{name}_us", []).append(wall / options.calls * 1e6)
                samples.setdefault(f"{name}_loop_cpu_us", []).append(cpu / options.calls * 1e6)
                samples.setdefault(f"{name}_stall_ms", []).append(stall * 1e3)
            with app.connection_for_write() as connection:
                connection.default_channel.queue_purge(QUEUE)
    print(json.dumps({name: spread(values) for name, values in samples.items()}, indent=2))


if __name__ == "__main__":
    main()
