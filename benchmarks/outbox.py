"""What a durable ``on_commit`` costs next to a plain one, and how fast relays drain a backlog.

``python -m benchmarks.outbox --calls 500 --rounds 5`` prints JSON:

* per call, at the caller (a web request's shape: an ``asyncio.run()`` loop, a new
  ``AsyncSession`` per call, one row written, one message): wall and CPU microseconds for
  ``plain`` (``on_commit(sig, session=...)``) and ``durable`` (``durable=True``: the outbox
  row in the transaction, then the DELETE after the publish), alternating in each round;
  medians and spread over the rounds, and their ratio;
* relay throughput: ``--backlog`` rows left in the outbox (the fast path paused), drained by
  1 and by 4 relay processes side by side (``python -m async_session_task relay --once``, on
  this module's app): messages per second, the processes' start-up included.

Needs PostgreSQL and Redis (``AST_BENCH_ADMIN_URL``; the broker is ``--broker``). A database
``ast_bench_<pid>`` is made for the run and dropped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from async_session_task import AsyncSessionTask, _outbox, on_commit
from benchmarks import _db
from benchmarks._stats import spread

QUEUE = "bench-outbox"  # no worker consumes it; purged after each round
app = Celery(
    "bench_outbox", broker=os.environ.get("AST_BENCH_OUTBOX_BROKER", "redis://127.0.0.1:6379/0")
)
app.conf.task_routes = {"bench.outbox": {"queue": QUEUE}}
# The relay processes relay the database of the app's AsyncSessionTask tasks.
app.conf.async_session_url = os.environ.get("AST_BENCH_OUTBOX_URL")


@app.task(name="bench.outbox")
def target(n: int) -> int:
    return n


@app.task(name="bench.outbox_owner", base=AsyncSessionTask)
async def owner() -> None:
    """Never run: it tells the relay which database to relay."""


async def calls(engine: AsyncEngine, n: int, durable: bool) -> tuple[float, float]:
    """``n`` requests, each a transaction with one row and one message: (wall, CPU) s."""
    maker = async_sessionmaker(engine)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        async with maker() as session:
            await session.execute(text("INSERT INTO bench_rows (n) VALUES (:n)"), {"n": i})
            on_commit(target.s(i), session=session, durable=durable)
            await session.commit()
    return time.perf_counter() - wall, time.process_time() - cpu


async def backlog(engine: AsyncEngine, n: int) -> None:
    """``n`` committed durable messages that the fast path left to the relay."""
    _outbox._paused_until = float("inf")
    try:
        maker = async_sessionmaker(engine)
        for start in range(0, n, 500):
            async with maker() as session:
                for i in range(start, min(n, start + 500)):
                    on_commit(target.s(i), session=session, durable=True)
                await session.commit()
    finally:
        _outbox._paused_until = 0.0
        await engine.dispose()


def drain(url: str, broker: str, relays: int) -> float:
    """Seconds ``relays`` relay processes side by side take to publish every due row."""
    env = {**os.environ, "AST_BENCH_OUTBOX_URL": url, "AST_BENCH_OUTBOX_BROKER": broker}
    command = [sys.executable, "-m", "async_session_task", "relay", "-A", "benchmarks.outbox"]
    started = time.perf_counter()
    processes = [
        subprocess.Popen([*command, "--once", "--grace", "0"], env=env, stdout=subprocess.DEVNULL)
        for _ in range(relays)
    ]
    for process in processes:
        if process.wait(600) != 0:
            raise RuntimeError(f"a relay failed: exit {process.returncode}")
    return time.perf_counter() - started


def purge() -> None:
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(QUEUE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    options = parser.parse_args()
    app.conf.broker_url = options.broker
    report: dict[str, Any] = {"calls": options.calls, "rounds": options.rounds}
    with _db.bench_database(1, []) as database:
        url = database.replace("postgresql://", "postgresql+asyncpg://")
        _db.execute(database, "CREATE TABLE bench_rows (id serial PRIMARY KEY, n integer)")

        async def per_call() -> dict[str, list[float]]:
            engine = create_async_engine(url)
            await calls(engine, 50, False)  # warm up: connections, first sessions
            await calls(engine, 50, True)
            samples: dict[str, list[float]] = {}
            for _ in range(options.rounds):
                for way in ("plain", "durable"):
                    wall, cpu = await calls(engine, options.calls, way == "durable")
                    samples.setdefault(f"{way}_us", []).append(wall / options.calls * 1e6)
                    samples.setdefault(f"{way}_cpu_us", []).append(cpu / options.calls * 1e6)
                    purge()
            await engine.dispose()
            return samples

        samples = asyncio.run(per_call())
        report.update({name: spread(values) for name, values in samples.items()})
        for unit in ("us", "cpu_us"):
            ratios = [
                durable / plain
                for durable, plain in zip(
                    samples[f"durable_{unit}"], samples[f"plain_{unit}"], strict=True
                )
            ]
            report[f"durable_vs_plain_{unit}"] = spread([100 * r for r in ratios])  # percent
        for relays in (1, 4):
            asyncio.run(backlog(create_async_engine(url), options.backlog))
            seconds = drain(url, options.broker, relays)
            purge()
            report[f"relay_{relays}_messages_per_s"] = round(options.backlog / seconds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
