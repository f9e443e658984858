"""The benchmark (``nox -s bench``) on a tiny workload, so it cannot rot. Speed is not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.pool import AsyncAdaptedQueuePool

from async_session_task import AsyncSessionTask, _ping
from async_session_task._config import Settings
from async_session_task._factory import engines_of, session_factory
from benchmarks import _pgbouncer, _report, impl_library
from benchmarks._variants import DEFAULTS, IMPLEMENTATIONS
from benchmarks._workers import WORKLOADS
from benchmarks.bridge import WAYS

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("tasks_per_s", "cpu_ms_per_task", "main_cpu_ms_per_task", "peak_rss_mb", "pss_mb")
SPREAD = {"median", "q1", "q3", "min", "max", "n"}
#: Why the PgBouncer row is skipped on this machine (the benchmark says so), or None.
NO_PGBOUNCER = _pgbouncer.missing()


def bench(out: Path, *args: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "benchmarks", "--rounds", "2", "--tasks", "12", "--timeout", "30",
        "--json", str(out / "latest.json"), "--docs", str(out / "docs"), *args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    data["_stdout"] = done.stdout
    data["_stderr"] = done.stderr
    return data


@pytest.fixture(scope="module")
def results(services: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    data = bench(out, "--io-tasks", "12", "--bridge-calls", "20", "--db-calls", "4")
    data["_docs"] = (out / "docs" / "performance.md").read_text()
    return data


@pytest.mark.parametrize("workload", ["db-prefork", "io-threads"])
def test_every_implementation_completes_its_tasks(results: dict[str, Any], workload: str) -> None:
    data = results["workloads"][workload]
    assert list(data["implementations"]) == list(DEFAULTS[workload])
    for name, impl in data["implementations"].items():
        if IMPLEMENTATIONS[name].pgbouncer and NO_PGBOUNCER:
            assert impl["status"] == "skipped", impl
            assert impl["error"] == NO_PGBOUNCER, impl
            assert impl["rounds"] == [], name
            continue
        assert impl["status"] == "ok", (name, impl["error"])
        assert impl["sent"] == impl["succeeded"] == 2 * 12, name
        assert [sample["round"] for sample in impl["rounds"]] == [0, 1], name
        assert all(set(impl[metric]) >= SPREAD for metric in METRICS), name
        # Each success incremented one counter row once (the no-op task touches none).
        expected = None if IMPLEMENTATIONS[name].first_row is None else "ok"
        assert impl["db_check"] == expected, name
        for sample in impl["rounds"]:
            parts = sample["main_cpu_ms_per_task"] + sample["children_cpu_ms_per_task"]
            assert parts == pytest.approx(sample["cpu_ms_per_task"]), name
            # The other workers were stopped while this one was measured.
            assert sample["idle_cpu_ms_per_task"] == 0.0, name
            if not IMPLEMENTATIONS[name].pgbouncer:
                assert sample["pgbouncer_cpu_ms_per_task"] == 0.0, name


def test_the_pgbouncer_row_went_through_pgbouncer(results: dict[str, Any]) -> None:
    if NO_PGBOUNCER:
        # Not a failure of the benchmark: it skips the row and prints why.
        assert f"skipping library-pgbouncer: {NO_PGBOUNCER}" in results["_stderr"]
        assert "pgbouncer" not in results
        pytest.skip(NO_PGBOUNCER)
    pgbouncer = results["pgbouncer"]
    assert pgbouncer["pool_mode"] == "transaction"
    assert pgbouncer["default_pool_size"] == 4
    assert pgbouncer["server_reset_query_always"] == 0
    # The worker's pooled client connections logged in through it.
    assert pgbouncer["client_logins"] >= 1
    assert results["machine"]["pgbouncer"].startswith("PgBouncer ")


def _engine(name: str) -> Any:
    """The engine the library makes in a worker of implementation ``name``, built the way
    its first run builds it (the app configured from the variant's environment)."""
    app = Celery(f"bench-{name}", set_as_current=False)
    environ = dict(IMPLEMENTATIONS[name].env)
    if IMPLEMENTATIONS[name].pgbouncer:
        environ["AST_BENCH_PGBOUNCER"] = "postgresql+asyncpg://root@127.0.0.1:6432/ast_bench"
    impl_library.configure(app, environ)

    @app.task(name="bench.probe", base=AsyncSessionTask, shared=False)
    async def probe() -> None:
        """Never run: its settings are read."""

    (engine,) = engines_of(session_factory(Settings.of(probe), {}))
    return engine


def test_the_defaults_variant_pre_pings_and_the_others_say_what_they_change() -> None:
    assert _ping.installed(_engine("library"))
    assert not _ping.installed(_engine("library-nopreping"))
    assert not _ping.installed(_engine("library-tuned"))
    bouncer = _engine("library-pgbouncer")
    assert isinstance(bouncer.pool, AsyncAdaptedQueuePool)
    assert bouncer.url.port == 6432
    assert _ping.installed(bouncer)  # the library's default, kept by the preset


def test_every_ratio_is_paired_by_round(results: dict[str, Any]) -> None:
    ratios = results["workloads"]["db-prefork"]["ratios"]
    skipped = {"library-pgbouncer"} if NO_PGBOUNCER else set()
    assert set(ratios) == set(DEFAULTS["db-prefork"]) - skipped
    for name, against in ratios.items():
        # Variants of the library are also divided by the library's defaults.
        library = {"library"} if name.startswith("library-") else set()
        assert set(against) == ({"sync", "naive"} | library) - {name}, name
        for metrics in against.values():
            for value in metrics.values():
                assert set(value) >= SPREAD
                assert len(value["rounds"]) == value["n"] == 2
                assert value["min"] <= value["q1"] <= value["median"] <= value["q3"] <= value["max"]
    target = results["targets"][0]
    assert target["name"].startswith("DB prefork: CPU per task vs sync")
    assert target["value"] == ratios["library"]["sync"]["cpu_ms_per_task"]


def test_gevent_workload_reports_each_implementation(results: dict[str, Any]) -> None:
    impls = results["workloads"]["io-gevent"]["implementations"]
    # uvloop has no place in a gevent worker: its variant is not run there.
    assert list(impls) == list(DEFAULTS["io-gevent"])
    for name in ("sync", "noop"):
        assert impls[name]["status"] == "ok", (name, impls[name]["error"])
        assert impls[name]["succeeded"] == impls[name]["sent"] == 2 * 12
    # asyncio.run() cannot run in a gevent worker: every greenlet shares the OS thread's loop.
    assert impls["naive"]["status"] == "failed"
    assert "asyncio.run() cannot be called from a running event loop" in impls["naive"]["error"]
    library = impls["library"]
    assert library["status"] == "ok", library["error"]
    assert library["succeeded"] == library["sent"] == 2 * 12
    assert library["db_check"] == "ok"


def test_in_process_measures_every_way(results: dict[str, Any]) -> None:
    bridge = results["bridge"]
    assert "error" not in bridge, bridge
    assert set(bridge["ways"]) == set(WAYS)
    for way in bridge["ways"].values():
        assert len(way["rounds"]) == 2
        assert way["min"] <= way["median"] <= way["max"]
    assert isinstance(bridge["overhead_us"], float)
    # The same ways in a process that runs its loop inline, as prefork children do.
    assert set(bridge["inline"]["ways"]) == set(WAYS)
    assert isinstance(bridge["inline"]["overhead_us"], float)
    # The DB body in process: each way ran (and committed) against PostgreSQL.
    db_ways = {
        "asyncio",
        "asyncio_run_sync",
        "library_call",
        "library_run_sync",
        "library_apply",
        "sync",
        "sync_apply",
    }
    assert set(bridge["db"]) == db_ways
    # The drivers alone, measured once, where the loop runs inline.
    assert set(bridge["inline"]["db"]) == db_ways | {"asyncpg_alone", "psycopg_alone"}
    assert all(way["cpu_median"] > 0 for way in bridge["db"].values())
    # Greenlet switches, counted where the loop runs in the calling thread.
    switches = {name: way["switches"] for name, way in bridge["inline"]["db"].items()}
    assert switches["sync"] == switches["sync_apply"] == 0
    assert switches["library_call"] > switches["asyncio"] > 0


def test_report_states_machine_targets_and_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    assert machine["cpus"] >= 1
    assert machine["packages"]["celery"] != "not installed"
    assert machine["packages"]["uvloop"] != "not installed"
    assert set(machine["load_average"]) == {"before", "after"}
    names = [target["name"] for target in results["targets"]]
    assert any("naive" in name for name in names)
    assert any("Bridge" in name for name in names)
    assert "async_session_task + uvloop" in results["_stdout"]
    assert "greenlet switches per run" in results["_docs"]
    # The gap to the sync pattern, split into its parts, which add up to the whole.
    assert "### Where the gap goes" in results["_docs"]
    gap = _report.gap_rows(results)
    *parts, (_, whole, _) = gap
    assert len(parts) == len(_report.GAP_PARTS)
    assert abs(sum(float(part) for _, part, _ in parts) - float(whole)) <= len(parts)
    for workload in WORKLOADS.values():
        assert workload.title in results["_docs"]
    assert "<!-- bench:begin -->" in results["_docs"]


def test_what_harnesses_may_count_differently(
    services: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Results not stored (the driver watches the counters), an INFO log, idle workers left
    running: each still measured, and the idle workers' CPU counted."""
    out = tmp_path_factory.mktemp("bench-factors")
    names = "library-noresult,sync-info"
    data = bench(out, "--workloads", "db-prefork", "--implementations", names, "--no-pause")
    assert data["settings"]["paused"] is False
    impls = data["workloads"]["db-prefork"]["implementations"]
    assert list(impls) == names.split(",")
    for name, impl in impls.items():
        assert impl["status"] == "ok", (name, impl["error"])
        assert impl["succeeded"] == 2 * 12
        assert impl["db_check"] == "ok", name
        assert all(sample["idle_cpu_ms_per_task"] >= 0 for sample in impl["rounds"])
    assert "bridge" not in data
