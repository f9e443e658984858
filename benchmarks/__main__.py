"""``python -m benchmarks``: run every workload, print the table, write JSON and the docs page.

Needs PostgreSQL and Redis (``AST_BENCH_ADMIN_URL``, ``AST_BENCH_BROKER``; defaults on
127.0.0.1). A database ``ast_bench_<pid>`` is created for the run and dropped after it. The
PgBouncer row starts a PgBouncer of its own in front of that database (``pgbouncer``, in
``/usr/sbin`` on Debian); without it the row is skipped, and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from benchmarks import _db, _machine, _pgbouncer, _report
from benchmarks._variants import DEFAULTS, IMPLEMENTATIONS
from benchmarks._workers import WORKLOADS, Driver, run_workload

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("benchmarks")


def _names(text: str, known: list[str]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return names


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--rounds", type=int, help="rounds of the DB workload (15; long: 31)")
    parser.add_argument("--tasks", type=int, help="tasks per DB batch (300; long: 600)")
    parser.add_argument(
        "--io-rounds", type=int, help="rounds of the IO-bound workloads and the bridge (7; 15)"
    )
    parser.add_argument("--io-tasks", type=int, default=200, help="tasks per batch, IO-bound")
    parser.add_argument(
        "--long",
        action="store_true",
        help="every implementation on the DB workload, more rounds and tasks",
    )
    parser.add_argument(
        "--no-pause",
        action="store_true",
        help="leave the other workers running (idle) while one is measured",
    )
    parser.add_argument("--bridge-calls", type=int, default=2000, help="calls per bridge round")
    parser.add_argument(
        "--db-calls", type=int, default=200, help="DB body calls per in-process round (0: none)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a batch may take")
    parser.add_argument(
        "--workloads",
        type=lambda text: _names(text, [*WORKLOADS, "bridge"]),
        default=[*WORKLOADS, "bridge"],
        help="comma-separated subset of: " + ", ".join([*WORKLOADS, "bridge"]),
    )
    parser.add_argument(
        "--implementations",
        type=lambda text: _names(text, list(IMPLEMENTATIONS)),
        help="comma-separated, for every workload whose pool they run on (default: a set per "
        "workload); of: " + ", ".join(IMPLEMENTATIONS),
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json"
    )
    parser.add_argument(
        "--docs", type=Path, default=ROOT / "docs", help="where performance.md goes"
    )
    parser.add_argument("--no-docs", action="store_true", help="write no docs page")
    options = parser.parse_args(argv)
    if options.rounds is None:
        options.rounds = 31 if options.long else 15
    if options.io_rounds is None:
        options.io_rounds = min(options.rounds, 15 if options.long else 7)
    if options.tasks is None:
        options.tasks = 600 if options.long else 300
    return options


def implementations(options: argparse.Namespace, workload: str) -> list[str]:
    """The implementations a workload runs: named, or its defaults (all with ``--long``)."""
    pool = WORKLOADS[workload].pool
    if options.implementations:
        names = options.implementations
    elif options.long and workload == "db-prefork":
        names = list(IMPLEMENTATIONS)
    else:
        names = list(DEFAULTS[workload])
    return [name for name in names if IMPLEMENTATIONS[name].runs_on(pool)]


def run(options: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    worker_workloads = [name for name in options.workloads if name in WORKLOADS]
    chosen = {name: implementations(options, name) for name in worker_workloads}
    rows = max(options.tasks, options.io_tasks)
    # Rows for every implementation: cheap, and the in-process ways use some of them.
    first_rows = [impl.first_row for impl in IMPLEMENTATIONS.values() if impl.first_row is not None]
    results: dict[str, Any] = {
        "settings": {
            "rounds": options.rounds,
            "io_rounds": options.io_rounds,
            "tasks": options.tasks,
            "io_tasks": options.io_tasks,
            "bridge_calls": options.bridge_calls,
            "db_calls": options.db_calls,
            "implementations": chosen,
            "paused": not options.no_pause,
            "long": options.long,
        },
        "workloads": {},
    }
    load_before = os.getloadavg()
    with _db.bench_database(rows, first_rows) as database, contextlib.ExitStack() as stack:
        results["machine"] = _machine.describe(database)
        pgbouncer, skipped = _start_pgbouncer(chosen, database, stack)
        if pgbouncer is not None:
            results["machine"]["pgbouncer"] = _pgbouncer.version()
        driver = Driver(pause=not options.no_pause)
        for name in worker_workloads:
            workload = WORKLOADS[name]
            tasks = options.tasks if workload.wait == 0 else options.io_tasks
            outcomes = run_workload(
                driver,
                workload,
                chosen[name],
                rounds=options.rounds if workload.wait == 0 else options.io_rounds,
                tasks=tasks,
                database=database,
                timeout=options.timeout,
                pgbouncer=pgbouncer,
                skipped=skipped,
            )
            results["workloads"][name] = {
                "title": workload.title,
                "pool": workload.pool,
                "concurrency": workload.concurrency,
                "wait_ms": workload.wait * 1000,
                "tasks": tasks,
                "implementations": {n: outcome.summary() for n, outcome in outcomes.items()},
            }
            results["workloads"][name]["ratios"] = _report.ratios(results["workloads"][name])
        if pgbouncer is not None:
            # Its log has a line per client login: the runs that went through it.
            logins = pgbouncer.log.count(" login attempt: ")
            results["pgbouncer"] = {**PGBOUNCER_SETTINGS, "client_logins": logins}
        if "bridge" in options.workloads:
            results["bridge"] = _bridge(options, database)
    results["machine"]["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["duration_s"] = time.monotonic() - started
    results["measured_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["targets"] = _report.targets(results)
    return results


#: The PgBouncer of the PgBouncer row: transaction pooling and a small server pool, as
#: docs/deployment.md#pgbouncer-in-transaction-mode describes it; no DISCARD ALL after each
#: transaction, which the preset's unnamed statements do not need.
PGBOUNCER_SETTINGS = {
    "pool_mode": "transaction",
    "default_pool_size": 4,
    "server_reset_query_always": 0,
}


def _start_pgbouncer(
    chosen: dict[str, list[str]], database: str, stack: contextlib.ExitStack
) -> tuple[_pgbouncer.PgBouncer | None, dict[str, str]]:
    """A PgBouncer in front of the bench database if an implementation chosen needs one;
    else, or if it cannot start, None, with why for each implementation that needed it."""
    needing = sorted({n for ns in chosen.values() for n in ns if IMPLEMENTATIONS[n].pgbouncer})
    if not needing:
        return None, {}
    reason = _pgbouncer.missing()
    if reason is None:
        url = make_url(database)
        try:
            return stack.enter_context(
                _pgbouncer.PgBouncer(
                    url.port or 5432,
                    str(url.database),
                    host=url.host or "127.0.0.1",
                    user=url.username or "root",
                    pool_size=PGBOUNCER_SETTINGS["default_pool_size"],
                )
            ), {}
        except RuntimeError as exc:
            reason = str(exc)[:300]
    logger.warning("skipping %s: %s", ", ".join(needing), reason)
    return None, dict.fromkeys(needing, reason)


def _bridge(options: argparse.Namespace, database: str) -> dict[str, Any]:
    """The bridge with a loop thread (and the DB body); then, in another process, with
    the loop inline, as in prefork children and solo workers."""
    result = _bridge_process(options, database, "--db-calls", str(options.db_calls))
    if "error" not in result:
        result["inline"] = _bridge_process(
            options, database, "--inline", "--db-calls", str(options.db_calls)
        )
    return result


def _bridge_process(options: argparse.Namespace, database: str, *args: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "benchmarks.bridge", "--calls", str(options.bridge_calls),
        "--rows", str(max(options.tasks, options.io_tasks)), "--rounds", str(options.io_rounds),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "AST_BENCH_DATABASE": database}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = parse(argv)
    results = run(options)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(_report.table(results))
    print(f"\nJSON: {options.json}")
    if not options.no_docs:
        for path in _report.write_docs(results, options.docs):
            print(f"docs: {path}")


if __name__ == "__main__":
    main()
