"""The machine a run was measured on, as stated next to its numbers."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from benchmarks import _db
from benchmarks._apps import BROKER_URL

PACKAGES = (
    "async-session-task",
    "celery",
    "kombu",
    "billiard",
    "sqlalchemy",
    "asyncpg",
    "psycopg",
    "gevent",
    "greenlet",
    "redis",
    "uvloop",
)


def describe(database_url: str) -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "source": _source(),
        "postgresql": _db.server_version(database_url),
        "redis": str(redis.Redis.from_url(BROKER_URL).info("server").get("redis_version")),
    }


def _source() -> str:
    """The commit the library was measured at, and whether its files had local changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "async_session_task")
    return f"{commit} with local changes to async_session_task/" if changed else commit


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def text(results: dict[str, Any]) -> str:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    load = machine.get("load_average", {})
    before = ", ".join(f"{x:.2f}" for x in load.get("before", ()))
    after = ", ".join(f"{x:.2f}" for x in load.get("after", ()))
    return "\n".join(
        [
            f"- CPU: {machine['cpu_model']}, {machine['cpus_usable']} usable of "
            f"{machine['cpus']} cores; {machine['memory_gb']} GB RAM",
            f"- {machine['system']}, {machine['python']}, "
            f"PostgreSQL {machine['postgresql']}, Redis {machine['redis']}"
            + (f", {machine['pgbouncer']}" if "pgbouncer" in machine else ""),
            f"- Packages: {packages}; library source: {machine.get('source', 'unknown')}",
            f"- Load average (1, 5, 15 min) before the run: {before}; after: {after}",
        ]
    )
