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

WAYS = ("sync", "asyncio", "library_call", "library_apply", "sync_apply")


def _package(path: str) -> str:
    """``.../site-packages/sqlalchemy/orm/session.py`` -> ``sqlalchemy``."""
    if path == "~":
        return "built-in functions (greenlet switch, socket, epoll, ...)"
    parts = path.split("/")
    for marker in ("site-packages", "async_session_task", "benchmarks"):
        if marker in parts:
            index = parts.index(marker)
            return parts[index] if marker != "site-packages" else parts[index + 1]
    return "asyncio" if "/asyncio/" in path else "standard library"


def by_package(stats: pstats.Stats, calls: int) -> dict[str, float]:
    """Own CPU time per run, in microseconds, summed by package."""
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for (path, _, _), value in entries.items():
        name = _package(path)
        totals[name] = totals.get(name, 0.0) + 1e6 * value[2] / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


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
        from async_session_task import _process
        from benchmarks.bridge import db_ways, measure

        _process.set_worker_pool("solo", os.getpid())  # the loop inline, as in a solo worker
        with db_ways(options.calls) as ways:
            # Unprofiled first, the ways alternating round by round.
            rounds = 10
            measured = measure({name: ways[name] for name in WAYS}, options.calls // rounds, rounds)
            for name, way in measured.items():
                print(
                    f"{way['cpu_median']:8.1f} us CPU/run unprofiled "
                    f"({way['cpu_min']:.1f}-{way['cpu_max']:.1f})  {name}: {way['what']}"
                )
            profiles = {}
            for name in ("sync", "asyncio", "library_apply", "sync_apply"):
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
    print("\n--- own CPU per run by package, profiled (us): " + ", ".join(profiles))
    tables = {name: by_package(stats, options.calls) for name, stats in profiles.items()}
    for package in tables["library_apply"] | tables["sync_apply"]:
        cells = " ".join(f"{tables[name].get(package, 0.0):9.1f}" for name in profiles)
        print(f"{cells}  {package}")
    print("\n--- every function, plain SQLAlchemy asyncio")
    print("\n".join(_rows(profiles["asyncio"], options.calls, "", options.top)))


if __name__ == "__main__":
    main()
