"""The benchmark (``nox -s bench``) on a tiny workload, so it cannot rot. Speed is not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks._workers import IMPLEMENTATIONS, WORKLOADS
from benchmarks.bridge import WAYS

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("tasks_per_s", "cpu_ms_per_task", "peak_rss_mb", "pss_mb")


@pytest.fixture(scope="module")
def results(services: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "benchmarks",
        "--rounds", "2", "--tasks", "12", "--io-tasks", "12",
        "--bridge-calls", "20", "--db-calls", "4", "--timeout", "30",
        "--json", str(out / "latest.json"), "--docs", str(out / "docs"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    data["_stdout"] = done.stdout
    data["_docs"] = (out / "docs" / "performance.md").read_text()
    data["_plot"] = (out / "docs" / "performance.svg").read_text()
    return data


@pytest.mark.parametrize("workload", ["db-prefork", "io-threads"])
def test_every_implementation_completes_its_tasks(results: dict[str, Any], workload: str) -> None:
    data = results["workloads"][workload]
    assert list(data["implementations"]) == list(IMPLEMENTATIONS)
    for name, impl in data["implementations"].items():
        assert impl["status"] == "ok", (name, impl["error"])
        assert impl["sent"] == impl["succeeded"] == 2 * 12, name
        assert len(impl["rounds"]) == 2, name
        assert all(metric in impl for metric in METRICS), name
        # Each success incremented one counter row once (the no-op task touches none).
        assert impl["db_check"] == ("ok" if IMPLEMENTATIONS[name][1] is not None else None), name


def test_gevent_workload_reports_each_implementation(results: dict[str, Any]) -> None:
    impls = results["workloads"]["io-gevent"]["implementations"]
    for name in ("sync", "noop"):
        assert impls[name]["status"] == "ok", (name, impls[name]["error"])
        assert impls[name]["succeeded"] == impls[name]["sent"] == 2 * 12
    # asyncio.run() cannot run in a gevent worker: every greenlet shares the OS thread's loop.
    assert impls["naive"]["status"] == "failed"
    assert "asyncio.run() cannot be called from a running event loop" in impls["naive"]["error"]
    # The library's row is measured when it works, and says why when it does not.
    library = impls["library"]
    if library["status"] == "ok":
        assert library["succeeded"] == library["sent"] == 2 * 12
        assert library["db_check"] == "ok"
    else:
        assert library["error"], library


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
    # The DB body in process: each of the five ways ran (and committed) against PostgreSQL.
    assert set(bridge["db"]) == {"asyncio", "library_call", "library_apply", "sync", "sync_apply"}
    assert all(way["cpu_median"] > 0 for way in bridge["db"].values())


def test_report_states_machine_targets_and_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    assert machine["cpus"] >= 1
    assert machine["packages"]["celery"] != "not installed"
    assert set(machine["load_average"]) == {"before", "after"}
    names = [target["name"] for target in results["targets"]]
    assert any("naive" in name for name in names)
    assert any("Bridge" in name for name in names)
    assert "async_session_task" in results["_stdout"]
    for workload in WORKLOADS.values():
        assert workload.title in results["_docs"]
    assert "<!-- bench:begin -->" in results["_docs"]
    assert results["_plot"].startswith("<svg")
    assert "<rect" in results["_plot"]
