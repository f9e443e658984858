"""Workload (c), in one process: what running an async body through a task costs.

``python -m benchmarks.bridge --calls 2000 --db-calls 200 --rounds 5`` prints JSON: wall and
CPU microseconds per call of each way to run ``async def body(x): return x`` (the trivial
ways), and of each way to run workload (a)'s DB body (read a row by primary key, increment,
commit) without a broker: plain asyncio, the library, plain sync SQLAlchemy, the sync pattern.
Medians and spread over the rounds; the ways alternate within each round. The trivial task
never touches its session, so none is made. With ``--inline`` the process runs its loop
inline, in the calling thread, as a prefork child or a solo worker does; without it, in a
loop thread, as every process that runs several tasks at once does (and any process that
is not a worker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import greenlet
import psycopg
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from async_session_task import AsyncSessionTask, _process
from benchmarks._apps import database_url, make_app

app = make_app("bench_bridge", backend=False)
app.conf.async_session_url = database_url("asyncpg")

#: A way to run something ``calls`` times.
Way = Callable[[int], None]


async def body(x: int) -> int:
    return x


@app.task(base=AsyncSessionTask)
async def trivial(x: int) -> int:
    return x


@app.task
def noop(x: int) -> int:
    return x


def _await_on_loop(calls: int) -> None:
    async def main() -> None:
        for index in range(calls):
            await body(index)

    asyncio.run(main())


def _run_until_complete(calls: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        for index in range(calls):
            loop.run_until_complete(body(index))
    finally:
        loop.close()


def _thread_hop(calls: int) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for index in range(calls):
            asyncio.run_coroutine_threadsafe(body(index), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _each(call: Callable[[int], Any]) -> Way:
    def run(calls: int) -> None:
        for index in range(calls):
            call(index)

    return run


#: name -> (what it measures, how)
WAYS: dict[str, tuple[str, Way]] = {
    "await": ("await body() on a running loop", _await_on_loop),
    "run_until_complete": (
        "loop.run_until_complete(body()) in the calling thread",
        _run_until_complete,
    ),
    "thread_hop": (
        "run_coroutine_threadsafe(body(), loop in another thread).result()",
        _thread_hop,
    ),
    "task_call": ("task(x): AsyncSessionTask called directly", _each(trivial)),
    "noop_call": ("sync_task(x): a sync task called directly", _each(noop)),
    "task_apply": (
        "task.apply((x,)): AsyncSessionTask through Celery's eager tracer",
        _each(lambda x: trivial.apply((x,))),
    ),
    "noop_apply": (
        "sync_task.apply((x,)): a sync task through the same tracer",
        _each(lambda x: noop.apply((x,))),
    ),
}


#: The DB body's statements without SQLAlchemy: what the drivers and the loop cost alone.
_SELECT = "SELECT id, value FROM bench_counter WHERE id = {}"
_UPDATE = "UPDATE bench_counter SET value = {} WHERE id = {}"


@contextlib.contextmanager
def db_ways(rows: int, drivers: bool = False) -> Iterator[dict[str, tuple[str, Way]]]:
    """Workload (a)'s body, five ways, on the rows of the library and sync implementations;
    with ``drivers``, also its four statements sent by asyncpg and by psycopg alone."""
    # Imported here: they read the bench database's URL, which only a benchmark run sets.
    from benchmarks import impl_library, impl_sync
    from benchmarks._model import Counter
    from benchmarks._variants import IMPLEMENTATIONS

    library_rows = IMPLEMENTATIONS["library"].first_row
    sync_rows = IMPLEMENTATIONS["sync"].first_row
    assert library_rows is not None
    assert sync_rows is not None
    loop = asyncio.new_event_loop()
    engine = create_async_engine(database_url("asyncpg"))
    maker = async_sessionmaker(engine, expire_on_commit=False)

    async def plain_async(row_id: int) -> int:
        async with maker() as session:
            counter = await session.get(Counter, row_id)
            assert counter is not None
            counter.value += 1
            await session.commit()
            return counter.value

    async def plain_run_sync(row_id: int) -> int:
        async with maker() as session:
            return await session.run_sync(impl_library.change, row_id)

    @app.task(bind=True, base=AsyncSessionTask)
    async def library_run_sync(self: AsyncSessionTask, row_id: int) -> int:
        return await self.session.run_sync(impl_library.change, row_id)

    def plain_sync(row_id: int) -> int:
        with impl_sync.SessionLocal() as session:
            counter = session.get(Counter, row_id)
            assert counter is not None
            counter.value += 1
            session.commit()
            return counter.value

    ways: dict[str, tuple[str, Way]] = {}
    raw_async: asyncpg.Connection | None = None
    raw_sync: psycopg.Connection[Any] | None = None
    if drivers:
        dsn = database_url("asyncpg").replace("postgresql+asyncpg://", "postgresql://", 1)
        raw_async = loop.run_until_complete(asyncpg.connect(dsn))
        raw_sync = psycopg.connect(dsn)

        async def asyncpg_alone(row_id: int, connection: asyncpg.Connection = raw_async) -> int:
            # As SQLAlchemy's adapter sends them: BEGIN, two prepared statements, COMMIT.
            async with connection.transaction():
                row = await connection.fetchrow(_SELECT.format("$1"), row_id)
                await connection.execute(_UPDATE.format("$1", "$2"), row["value"] + 1, row_id)
            return int(row["value"]) + 1

        def psycopg_alone(row_id: int, connection: psycopg.Connection[Any] = raw_sync) -> int:
            with connection.transaction():
                row = connection.execute(_SELECT.format("%s"), (row_id,), prepare=True).fetchone()
                assert row is not None
                connection.execute(_UPDATE.format("%s", "%s"), (row[1] + 1, row_id), prepare=True)
            return int(row[1]) + 1

        ways = {
            "asyncpg_alone": (
                "asyncpg alone on asyncio, no SQLAlchemy: the same four statements",
                _each(lambda i: loop.run_until_complete(asyncpg_alone(library_rows + i % rows))),
            ),
            "psycopg_alone": (
                "psycopg 3 alone, no SQLAlchemy: the same four statements",
                _each(lambda i: psycopg_alone(sync_rows + i % rows)),
            ),
        }
    try:
        yield ways | {
            "asyncio": (
                "plain SQLAlchemy asyncio + asyncpg: loop.run_until_complete in this thread",
                _each(lambda i: loop.run_until_complete(plain_async(library_rows + i % rows))),
            ),
            "asyncio_run_sync": (
                "plain SQLAlchemy asyncio + asyncpg, the ORM work in one session.run_sync()",
                _each(lambda i: loop.run_until_complete(plain_run_sync(library_rows + i % rows))),
            ),
            "library_call": (
                "AsyncSessionTask called directly: task(row, 0)",
                _each(lambda i: impl_library.work(library_rows + i % rows, 0)),
            ),
            "library_run_sync": (
                "AsyncSessionTask called directly, the ORM work in one session.run_sync()",
                _each(lambda i: library_run_sync(library_rows + i % rows)),
            ),
            "library_apply": (
                "AsyncSessionTask through Celery's eager tracer: task.apply()",
                _each(lambda i: impl_library.work.apply((library_rows + i % rows, 0))),
            ),
            "sync": (
                "plain sync SQLAlchemy + psycopg",
                _each(lambda i: plain_sync(sync_rows + i % rows)),
            ),
            "sync_apply": (
                "the sync pattern through Celery's eager tracer: task.apply()",
                _each(lambda i: impl_sync.work.apply((sync_rows + i % rows, 0))),
            ),
        }
    finally:
        if raw_async is not None:
            loop.run_until_complete(raw_async.close())
        if raw_sync is not None:
            raw_sync.close()
        # Disposed on the loop its connections belong to (docs/internals.md#dispose-on-loop).
        loop.run_until_complete(engine.dispose())
        loop.close()
        impl_sync.engine.dispose()


def switches(way: Way, calls: int = 20) -> float:
    """Greenlet switches per call of ``way`` in this thread (``greenlet.settrace``)."""
    count = 0

    def trace(event: str, args: Any) -> None:
        nonlocal count
        if event in ("switch", "throw"):
            count += 1

    previous = greenlet.settrace(trace)
    try:
        way(calls)
    finally:
        greenlet.settrace(previous)
    return count / calls


def measure(
    ways: dict[str, tuple[str, Way]], calls: int, rounds: int, count_switches: bool = False
) -> dict[str, Any]:
    """Wall and CPU microseconds per call of every way: per round, median, min and max;
    with ``count_switches``, the greenlet switches per call too (this thread's only)."""
    for _, run_way in ways.values():
        run_way(10)  # warm up: starts the loop thread, resolves session factories, connects
    wall: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for number in range(rounds):
        for name in [*names[number % len(names) :], *names[: number % len(names)]]:
            started, cpu_started = time.perf_counter(), time.process_time()
            ways[name][1](calls)
            wall[name].append(1e6 * (time.perf_counter() - started) / calls)
            cpu[name].append(1e6 * (time.process_time() - cpu_started) / calls)
    return {
        name: {
            "what": ways[name][0],
            "median": statistics.median(wall[name]),
            "min": min(wall[name]),
            "max": max(wall[name]),
            "rounds": wall[name],
            "cpu_median": statistics.median(cpu[name]),
            "cpu_min": min(cpu[name]),
            "cpu_max": max(cpu[name]),
            **({"switches": switches(ways[name][1])} if count_switches else {}),
        }
        for name in ways
    }


def run(calls: int, db_calls: int, rows: int, rounds: int, inline: bool = False) -> dict[str, Any]:
    """The trivial ways, then (if ``db_calls``) the DB ways."""
    if inline:
        # What worker_init records in a solo worker: the loop runs in the calling thread.
        _process.set_worker_pool("solo", os.getpid())
    ways = measure(WAYS, calls, rounds)
    median = {name: way["median"] for name, way in ways.items()}
    result: dict[str, Any] = {
        "calls": calls,
        "ways": ways,
        # What a task call costs over awaiting the body; what the library adds to Celery's
        # own direct call (its request stack) and to its eager tracer.
        "overhead_us": median["task_call"] - median["await"],
        "call_overhead_us": median["task_call"] - median["noop_call"],
        "apply_overhead_us": median["task_apply"] - median["noop_apply"],
    }
    if db_calls:
        result["db_calls"] = db_calls
        # The drivers alone once, in the process that runs its loop inline.
        with db_ways(rows, drivers=inline) as ways_with_db:
            # Where the loop runs inline, every switch happens in this thread: counted.
            result["db"] = measure(ways_with_db, db_calls, rounds, count_switches=inline)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--db-calls", type=int, default=0, help="0: no DB ways")
    parser.add_argument("--rows", type=int, default=1, help="counter rows per implementation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inline", action="store_true", help="the loop in the calling thread")
    options = parser.parse_args()
    print(
        json.dumps(
            run(options.calls, options.db_calls, options.rows, options.rounds, options.inline)
        )
    )


if __name__ == "__main__":
    main()
