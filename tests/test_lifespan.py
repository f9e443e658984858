"""The worker lifespan and the traces of runs, on real workers of every pool.

One worker per pool serves every assertion about it: the lifespan entered once per process
on its loop and shared by overlapping runs (a real ``httpx.AsyncClient`` against a server
this test runs, a real ``redis.asyncio`` client), exited at shutdown before the engines are
disposed; and OpenTelemetry's Celery and SQLAlchemy instrumentations (attached through
``engine_created``) writing the worker's spans to a file this test reads.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.faults.services import wait_for
from tests.helpers import BROKERS, HTTPServer, StartWorker, run_python

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
WAIT = 90
#: What a worker must never write at shutdown (a loop, client or coroutine left behind).
PROBLEMS = (
    "Event loop is closed",
    "Unclosed",
    "Task was destroyed but it is pending",
    "was never awaited",
    "still registered at shutdown",
)


def spans_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_span(spans: list[dict[str, Any]], task_id: str) -> dict[str, Any]:
    """The Celery instrumentation's span of the run of ``task_id``."""
    found = [
        s for s in spans if s["name"].startswith("run/") and task_id in s["attributes"].values()
    ]
    assert len(found) == 1, (task_id, found)
    return found[0]


def sql_spans(spans: list[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    """The SQLAlchemy instrumentation's spans of statements that contain ``marker``."""
    return [
        s
        for s in spans
        if not s["name"].startswith(("run/", "apply_async/"))
        and any(f"'{marker}'" in value for value in s["attributes"].values())
    ]


def lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(p in line for p in PROBLEMS)]


def pids_in(log: str, text: str) -> list[int]:
    """The pids of lines ``... <text> <pid>...`` (as the app's lifespan logs them)."""
    return [int(line.split(text, 1)[1].split()[0]) for line in lines_with(log, text)]


#: pool -> (concurrency, runs sent, how the worker is stopped)
POOLS = {
    "prefork": (2, 8, "sigterm"),
    "solo": (1, 4, "sigterm"),
    "threads": (8, 24, "control"),
    "gevent": (50, 100, "control"),
    "eventlet": (10, 20, "sigterm"),
}
#: eventlet patches select and threading: httpx (through httpcore and anyio) then calls a
#: green select() and starts green executor threads on the loop's thread, and eventlet's hub
#: takes over the greenlets the bodies are stepped from (docs/lifespan.md#eventlet). On
#: eventlet the runs share the Redis client only.
HTTP = {pool: pool != "eventlet" for pool in POOLS}


@pytest.mark.parametrize("pool", list(POOLS))
def test_lifespan_and_traces_on_a_real_worker(
    start_worker: StartWorker, http_server: HTTPServer, tmp_path: Path, pool: str
) -> None:
    """Lifespan semantics 1 and 2 and every trace property, on one worker of ``pool``."""
    concurrency, count, stop = POOLS[pool]
    spans_file = tmp_path / "spans.jsonl"
    env = {
        "AST_HTTP_URL": http_server.url,
        "AST_REDIS_URL": BROKERS["redis"],
        "AST_SPANS_FILE": str(spans_file),
        "PYTHONWARNINGS": "always::ResourceWarning",
        "PYTHONPATH": str(ROOT),
    }
    # prefork: each child is replaced after 3 runs, so children exit while the worker runs.
    args = ("--max-tasks-per-child=3",) if pool == "prefork" else ()
    engine_options = {"pool_size": concurrency, "max_overflow": 0} if concurrency > 5 else {}
    with start_worker(
        pool=pool,
        concurrency=concurrency,
        module="tests.apps.lifespan_app",
        env=env,
        args=args,
        engine_options=engine_options,
    ) as service:
        worker = service.worker
        main_pid = worker.process.pid
        keys = [uuid.uuid4().hex for _ in range(count)]
        # The server holds each request 0.3 s: the runs of one process overlap on its loop.
        results = [worker.send("tests.apps.lifespan_app.shared", k, 0.3, HTTP[pool]) for k in keys]
        reports = [r.get(timeout=WAIT) for r in results]
        key = uuid.uuid4().hex
        outer = worker.send("tests.apps.lifespan_app.outer", key, HTTP[pool]).get(timeout=WAIT)
        child = worker.app.AsyncResult(outer["child"]).get(timeout=WAIT)
        if stop == "control":
            worker.app.control.shutdown(destination=[worker.nodename])
            assert worker.process.wait(WAIT) == 0
        else:
            assert worker.stop() == 0
        log = worker.log

    # 1. Entered once per process, on that process's loop, never in the prefork parent.
    entered = pids_in(log, "lifespan entered in")
    run_pids = {report["pid"] for report in [*reports, outer, child]}
    assert sorted(entered) == sorted(set(entered)), "entered twice in one process"
    assert set(entered) == run_pids
    assert main_pid not in entered or pool != "prefork"
    if pool == "prefork":
        assert len(run_pids) > concurrency  # children were replaced (max_tasks_per_child)
    for report in reports:
        assert report["state_pid"] == report["pid"]  # made in the process that uses it
        assert report["status"] == (200 if HTTP[pool] else None)
        assert report["count"] == 1
        assert report["selected"] in keys
    # The clients are shared: one HTTP client and one Redis client per process.
    for pid in run_pids:
        mine = [r for r in reports if r["pid"] == pid]
        assert len({r["http"] for r in mine}) <= 1
        assert len({r["redis"] for r in mine}) <= 1
    if concurrency > 1 and HTTP[pool] and pool != "prefork":
        # Overlapping runs used the one client at once, over reused connections.
        assert http_server.most_in_flight > 1
        assert len(http_server.connections) < http_server.requests
    assert len(pids_in(log, "engine created in")) == len(run_pids)

    # 2. Exited at shutdown (and at each prefork child's recycling), before the engines
    # are disposed (their pools still held connections), with nothing left behind.
    exited = pids_in(log, "lifespan exiting in")
    assert sorted(exited) == sorted(entered), log[-3000:]
    pooled = [int(line.split(" with ")[1].split()[0]) for line in lines_with(log, "exiting in")]
    assert all(n >= 1 for n in pooled), pooled
    assert problems(log) == []

    spans = spans_of(spans_file)
    print(  # shown with -rP: what this pool's worker did
        f"{pool}: processes {len(run_pids)}, runs {len(reports) + 3}, "
        f"HTTP requests {http_server.requests} on {len(http_server.connections)} connections, "
        f"at most {http_server.most_in_flight} at once; spans {len(spans)}"
    )
    # Traces: each run's SQL spans are children of that run's Celery span, and carry its
    # trace id (never another overlapping run's).
    for result, report, k in zip(results, reports, keys, strict=True):
        run = run_span(spans, result.id)
        assert report["trace"] == {"trace_id": run["trace_id"], "span_id": run["span_id"]}
        statements = sql_spans(spans, k)
        assert statements, f"no SQL span for run {result.id}"
        for statement in statements:
            assert (statement["trace_id"], statement["parent_id"]) == (
                run["trace_id"],
                run["span_id"],
            )
    # A nested eager call's spans nest under its caller's run span.
    outer_span = [
        s
        for s in spans
        if s["name"] == "run/tests.apps.lifespan_app.outer"
        and s["span_id"] == outer["trace"]["span_id"]
    ]
    assert len(outer_span) == 1
    inner_span = run_span(spans, outer["nested"]["id"])
    assert inner_span["parent_id"] == outer_span[0]["span_id"]
    assert inner_span["trace_id"] == outer_span[0]["trace_id"]
    for statement in sql_spans(spans, f"inner-{key}"):
        assert statement["parent_id"] == inner_span["span_id"]
    for marker in (f"outer-before-{key}", f"outer-after-{key}"):
        (statement,) = sql_spans(spans, marker)
        assert statement["parent_id"] == outer_span[0]["span_id"]
    # delay() from a body: the child's run continues the caller's trace.
    child_run = run_span(spans, outer["child"])
    assert child_run["trace_id"] == outer_span[0]["trace_id"]
    publish = [s for s in spans if s["span_id"] == child_run["parent_id"]]
    assert len(publish) == 1
    assert publish[0]["name"].startswith("apply_async/")
    assert publish[0]["parent_id"] == outer_span[0]["span_id"]
    (child_sql,) = sql_spans(spans, f"child-{key}")
    assert child_sql["parent_id"] == child_run["span_id"]


def test_a_failing_lifespan_fails_every_run_without_a_crash_loop(
    start_worker: StartWorker, http_server: HTTPServer
) -> None:
    """Semantics 3: one clear error in the log; every run fails with it; the child is not
    replaced; what the lifespan opened before failing was closed by its own ``async with``."""
    env = {
        "AST_HTTP_URL": http_server.url,
        "AST_LIFESPAN": "failing_lifespan",
        "PYTHONWARNINGS": "always::ResourceWarning",
    }
    with start_worker(
        pool="prefork", concurrency=1, module="tests.apps.lifespan_app", env=env
    ) as service:
        worker = service.worker
        children = worker.child_pids()
        for _ in range(3):
            result = worker.send("tests.apps.lifespan_app.shared", uuid.uuid4().hex)
            with pytest.raises(RuntimeError) as failed:
                result.get(timeout=WAIT)
            assert "failing_lifespan failed at startup" in str(failed.value)
            assert "ConnectionError: the cache is not reachable" in str(failed.value)
        assert worker.child_pids() == children
        assert worker.stop() == 0
        log = worker.log
    (error,) = lines_with(log, "failed at startup in process")
    assert "ERROR" in error
    assert "tests.apps.lifespan_app:failing_lifespan" in error
    assert "ConnectionError: the cache is not reachable" in error
    assert problems(log) == []


def test_eager_runs_enter_the_lifespan_once_and_exit_it_with_the_process(
    database_url: str, http_server: HTTPServer
) -> None:
    """Semantics 4: apply() and task_always_eager enter the lifespan at first use in the
    process and share it; it is exited when the process ends; a test's substitute state
    replaces it; lifespan_state() outside a run, or without a lifespan, says why."""
    env = {
        **os.environ,
        "AST_DATABASE_URL": database_url,
        "AST_HTTP_URL": http_server.url,
        "AST_REDIS_URL": BROKERS["redis"],
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "always::ResourceWarning",
    }
    process = run_python("-m", "tests.apps.lifespan_eager", env=env, timeout=WAIT)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert "outside a task run" in report["outside"]
    assert "has no lifespan" in report["without_lifespan"]
    assert report["substituted"]["status"] == 418
    assert report["substituted"]["count"] == 41
    assert report["apply"]["status"] == report["delay"]["status"] == 200
    assert report["apply"]["http"] == report["delay"]["http"]
    assert report["apply"]["state_pid"] == report["apply"]["pid"]
    # Entered once (not for the substitute), exited after the last run, at process exit.
    assert len(lines_with(output, "lifespan entered in")) == 1
    (exiting,) = lines_with(output, "lifespan exiting in")
    assert int(exiting.split(" with ")[1].split()[0]) >= 1
    assert problems(output) == []


def test_autoscale_shrink_exits_the_lifespan_of_the_child_it_stops(
    start_worker: StartWorker, http_server: HTTPServer
) -> None:
    """Semantics 2, autoscale: the child the autoscaler stops exits its lifespan on its loop
    (before the worker stops), as every other child does at shutdown."""
    env = {
        "AST_HTTP_URL": http_server.url,
        "AST_REDIS_URL": BROKERS["redis"],
        "AUTOSCALE_KEEPALIVE": "1",  # seconds idle before the autoscaler shrinks the pool
        "PYTHONWARNINGS": "always::ResourceWarning",
    }
    with start_worker(
        pool="prefork",
        concurrency=2,
        module="tests.apps.lifespan_app",
        env=env,
        args=("--autoscale=2,1",),
    ) as service:
        worker = service.worker
        # Runs that hold the server 1 s make the autoscaler start a second child.
        results = [
            worker.send("tests.apps.lifespan_app.shared", uuid.uuid4().hex, 1.0) for _ in range(6)
        ]
        pids = {result.get(timeout=WAIT)["pid"] for result in results}
        wait_for(lambda: "Scaling down" in worker.log, WAIT, "the autoscaler to shrink the pool")
        wait_for(
            lambda: pids_in(worker.log, "lifespan exiting in"), WAIT, "the stopped child's exit"
        )
        (shrunk,) = pids_in(worker.log, "lifespan exiting in")
        assert worker.stop() == 0
        log = worker.log
    assert len(pids) == 2
    assert shrunk in pids
    assert sorted(pids_in(log, "lifespan exiting in")) == sorted(
        pids_in(log, "lifespan entered in")
    )
    assert problems(log) == []


def test_an_exit_that_hangs_is_cancelled_after_its_grace_period(database_url: str) -> None:
    """Semantics 2, bounded: a lifespan whose exit never ends is cancelled (its finally
    runs) and the process still ends, with a warning naming it."""
    code = "from tests.apps import lifespan_app\nprint(lifespan_app.state_keys.apply().get())\n"
    env = {
        **os.environ,
        "AST_DATABASE_URL": database_url,
        "AST_LIFESPAN": "stuck_lifespan",
        "PYTHONPATH": str(ROOT),
    }
    process = run_python("-c", code, env=env, timeout=WAIT)
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stdout.strip() == "['pid']"
    (warning,) = lines_with(process.stderr, "did not exit within")
    assert "tests.apps.lifespan_app:stuck_lifespan" in warning
    assert len(lines_with(process.stderr, "stuck lifespan cancelled in")) == 1
    assert problems(process.stderr) == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tests.apps.nowhere:lifespan", "does not resolve (ModuleNotFoundError"),
        (42, "must be a callable that takes the Celery app"),
    ],
)
def test_a_lifespan_setting_that_cannot_work_fails_the_run(
    tmp_path: Path, setting: Any, message: str
) -> None:
    """The setting is checked at the first run (and at worker start, by the same code)."""
    from celery import Celery
    from celery.exceptions import ImproperlyConfigured

    from async_session_task import AsyncSessionTask

    app = Celery("misconfigured-lifespan", set_as_current=False)
    app.conf.async_session_url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"

    @app.task(base=AsyncSessionTask, async_session_lifespan=setting, shared=False)
    async def uses_lifespan() -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"async_session_lifespan .*") as failed:
        uses_lifespan.apply(throw=True)
    assert message in str(failed.value)
