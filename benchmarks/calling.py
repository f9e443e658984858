"""What sending from async code costs, and how long it holds the event loop.

``python -m benchmarks.calling --calls 500 --rounds 5`` prints JSON:

* per call, one after the other on an ``asyncio.run()`` loop: ``delay()`` called on the loop
  against ``await adelay()``: wall and loop-thread CPU microseconds, alternating in each
  round; medians and spread;
* the loop's longest stall (a ticker every 1 ms) while 200 requests send at once, each with
  ``delay()`` and each with ``adelay()``.

Needs Redis (``--broker``); the messages go to a queue no worker consumes, purged after each
round.

``--served`` measures a real web app instead (``benchmarks/_web.py`` under uvicorn, a threads
worker consuming): on Redis, on RabbitMQ with Redis results, and on RabbitMQ with ``rpc://``,
rounds alternating, 200 concurrent HTTP requests each sending and waiting (``adelay`` +
``aget``, against ``delay()`` + ``get()`` in the handler, and against sending nothing): the
server loop's longest stall and the batch's wall time; one request at a time: the round
trip; and, on Redis, the Redis connections subscribed while 1,000 waiters wait in one
process (``CLIENT LIST``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import redis
from celery import Celery

from async_session_task import AsyncSessionTask, aget
from benchmarks._stats import spread

QUEUE = "bench-calling"
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
#: The served setups: broker, result backend.
SETUPS = {"redis": (REDIS, REDIS), "amqp": (AMQP, REDIS), "amqp-rpc": (AMQP, "rpc://")}
app = Celery(
    "bench_calling",
    broker=os.environ.get("AST_BENCH_BROKER", REDIS),
    backend=os.environ.get("AST_BENCH_BACKEND", REDIS),
    set_as_current=False,
)
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


@contextlib.contextmanager
def served(setup: str) -> Iterator[str]:
    """A threads worker and the web app under uvicorn on ``setup``; the app's base URL."""
    broker, backend = SETUPS[setup]
    env = {**os.environ, "AST_BENCH_BROKER": broker, "AST_BENCH_BACKEND": backend}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = [
        sys.executable, "-m", "celery", "-A", "benchmarks.calling", "worker", "-P", "threads",
        "-c", "16", "-Q", QUEUE, "-l", "warning", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    server = [
        sys.executable, "-m", "uvicorn", "benchmarks._web:api", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--backlog", "1024",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        for command in (worker, server)
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/async/0", timeout=60).json() == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{setup}: the served app never answered")
        yield base
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


async def requests_at_once(base: str, way: str, requests: int) -> tuple[float, float]:
    """``requests`` concurrent requests: the batch's wall time (s), the server's longest
    loop stall meanwhile (ms)."""
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        await client.post("/stall")
        wall = time.perf_counter()
        answers = await asyncio.gather(*(client.get(f"/{way}/{i}") for i in range(requests)))
        wall = time.perf_counter() - wall
        assert [answer.json() for answer in answers] == list(range(requests)), way
        return wall, float((await client.post("/stall")).json())


async def one_at_a_time(base: str, way: str, requests: int) -> float:
    """The mean round trip (s) of ``requests`` requests sent one after the other."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        wall = time.perf_counter()
        for i in range(requests):
            assert (await client.get(f"/{way}/{i}")).json() == i
        return (time.perf_counter() - wall) / requests


async def subscribed_waiters(waiters: int) -> tuple[int, int]:
    """With Redis results: the connections subscribed, and their most channels, while
    ``waiters`` results are awaited at once in this process."""
    sent = await asyncio.gather(*(target.adelay(i) for i in range(waiters)))
    client = redis.Redis.from_url(REDIS)
    seen: list[tuple[int, int]] = []

    async def watch() -> None:
        while True:
            listed = await asyncio.to_thread(client.client_list)
            subscribers = [int(c["sub"]) for c in listed if int(c.get("sub", 0))]
            seen.append((len(subscribers), max(subscribers, default=0)))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    values = await asyncio.gather(*(aget(result, timeout=120) for result in sent))
    watcher.cancel()
    client.close()
    assert values == list(range(waiters))
    return max(seen)


def serve(options: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for setup in options.setups.split(","):
        samples: dict[str, list[float]] = {}
        with served(setup) as base:
            for round_ in range(options.rounds + 1):  # the first round warms up
                for way in ("async", "sync", "none"):
                    wall, stall = asyncio.run(requests_at_once(base, way, options.requests))
                    trip = asyncio.run(one_at_a_time(base, way, 50))
                    if round_:
                        samples.setdefault(f"{way}_stall_ms", []).append(stall)
                        samples.setdefault(f"{way}_batch_ms", []).append(wall * 1e3)
                        samples.setdefault(f"{way}_round_trip_ms", []).append(trip * 1e3)
            found[setup] = {name: spread(values) for name, values in samples.items()}
            if setup == "redis":  # this process's app is on Redis
                connections, channels = asyncio.run(subscribed_waiters(1000))
                found[setup]["1000_waiters"] = {"connections": connections, "channels": channels}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--broker", default=REDIS)
    parser.add_argument("--served", action="store_true", help="a real web app (see above)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="for --served")
    options = parser.parse_args()
    if options.served:
        print(json.dumps(serve(options), indent=2))
        return
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
