"""What the library itself costs per run: cProfile over the DB body, loop inline.

``taskset -c 1 python -m benchmarks.hotspots --calls 2000`` makes a bench database, runs the
DB body (get + change + commit) ``--calls`` times each way, in a process that runs its loop
inline as a prefork child does, under cProfile, and prints per run: the CPU of each way
unprofiled, then the functions of ``async_session_task`` (own time and with callees) and the
costliest functions overall of the library's way. cProfile slows every call by a similar
amount; its own times are for ranking, the unprofiled CPU for sizes. A coroutine counts one
call per resumption.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from typing import Any

from benchmarks import _db
from benchmarks._variants import IMPLEMENTATIONS

WAYS = ("asyncio", "library_call", "library_apply", "sync_apply")


def _rows(stats: pstats.Stats, calls: int, where: str, top: int) -> list[str]:
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # pstats keeps it untyped
    chosen = [
        (key, value)
        for key, value in entries.items()
        if where in key[0] or (where == "" and key[0] != "~")
    ]
    chosen.sort(key=lambda item: item[1][2], reverse=True)  # own time
    lines = [f"{'own us/run':>10} {'cum us/run':>10} {'calls/run':>9}  function"]
    for (path, line, name), (_, ncalls, own, cumulative, _) in chosen[:top]:
        short = "/".join(path.split("/")[-2:])
        lines.append(
            f"{1e6 * own / calls:10.1f} {1e6 * cumulative / calls:10.1f} "
            f"{ncalls / calls:9.2f}  {name} ({short}:{line})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotspots", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args()
    first_rows = [IMPLEMENTATIONS[name].first_row or 0 for name in ("library", "sync")]
    with _db.bench_database(options.calls, first_rows) as database:
        os.environ["AST_BENCH_DATABASE"] = database
        from async_session_task import _runtime
        from benchmarks.bridge import db_ways

        _runtime._mark_one_at_a_time()  # the loop inline, as in a prefork child
        with db_ways(options.calls) as ways:
            for name in WAYS:
                ways[name][1](50)  # warm up: connect, compile, cache
            for name in WAYS:
                started = time.process_time()
                ways[name][1](options.calls)
                spent = time.process_time() - started
                print(f"{1e6 * spent / options.calls:8.1f} us CPU/run unprofiled  {name}")
            profiles = {}
            for name in ("asyncio", "library_apply"):
                # CPU time, not wall: waiting for PostgreSQL in epoll costs no CPU.
                profile = cProfile.Profile(time.process_time)
                profile.runcall(ways[name][1], options.calls)
                profiles[name] = pstats.Stats(profile)
    library = profiles["library_apply"]
    print("\n--- async_session_task functions, task.apply() with the loop inline")
    print("\n".join(_rows(library, options.calls, "async_session_task/", options.top)))
    entries: dict[Any, Any] = library.stats  # type: ignore[attr-defined]
    own = sum(v[2] for k, v in entries.items() if "async_session_task/" in k[0])
    print(f"{1e6 * own / options.calls:10.1f} us/run in all, own time (profiled)")
    print("\n--- every function, task.apply() with the loop inline")
    print("\n".join(_rows(library, options.calls, "", options.top)))
    print("\n--- every function, plain SQLAlchemy asyncio")
    print("\n".join(_rows(profiles["asyncio"], options.calls, "", options.top)))


if __name__ == "__main__":
    main()
