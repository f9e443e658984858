"""Profile one implementation's worker with py-spy while it runs benchmark batches.

``python -m benchmarks.profile --implementation library --workload db-prefork`` samples the
worker's processes (only threads holding the GIL: the CPU view), then prints the functions
that cost the most, inclusive and self, as percentages of the samples. ``--raw FILE`` keeps
py-spy's collapsed stacks (for a flame graph).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _db
from benchmarks._variants import IMPLEMENTATIONS
from benchmarks._workers import WORKLOADS, Driver, start_workers


def _frame(frame: str) -> str:
    """``function (path/to/module.py:12)`` -> ``function (module.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]}" + (")" if where else "")


def _package(frame: str) -> str:
    """``f (sqlalchemy/orm/session.py:1)`` -> ``sqlalchemy``; this project's modules by name."""
    path = frame.partition(" (")[2].split(":")[0]
    if path.startswith("<sqlalchemy"):  # its generated wrappers
        return "sqlalchemy"
    parts = path.split("/")
    if parts[0] in ("async_session_task", "benchmarks"):
        return path
    return parts[0].removesuffix(".py") if parts[0] else frame


def summarise(raw: Path, top: int) -> str:
    """Where the samples are: by process and thread, then by function inside pool children
    (or, on pools without children: threads, gevent, the main process)."""
    places: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = child_total = 0
    lines = raw.read_text().splitlines()
    # py-spy nests a child's stacks under its parent: two "process" frames.
    children = any(line.count(";process ") + line.startswith("process ") > 1 for line in lines)
    where = "pool children" if children else "main process"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        threads = [f for f in frames if f.startswith("thread ")]
        raw_code = [f for f in frames if not f.startswith(("process ", "thread "))]
        code = [_frame(f) for f in raw_code]
        samples = int(count)
        total += samples
        child = len(processes) > 1
        thread = "main thread" if threads and "MainThread" in threads[-1] else "other thread"
        places[f"{'pool child' if child else 'main process'}, {thread}"] += samples
        if child != children or not code:
            continue
        child_total += samples
        for frame in set(code):
            inclusive[frame] += samples
        own[code[-1]] += samples
        packages[_package(raw_code[-1])] += samples
    out = [f"{total} samples of threads holding the GIL"]
    out += [f"{100 * n / max(total, 1):5.1f}%  {place}" for place, n in places.most_common()]
    for title, counter in (("self, by package", packages), ("inclusive", inclusive), ("self", own)):
        out.append(f"--- {where}, {title} ({child_total} samples)")
        out += [
            f"{100 * n / max(child_total, 1):5.1f}%  {name}" for name, n in counter.most_common(top)
        ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--implementation", choices=list(IMPLEMENTATIONS), default="library")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="db-prefork")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    options = parser.parse_args()
    beside = Path(sys.executable).with_name("py-spy")
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None:
        parser.error("py-spy is not installed: pip install -e '.[bench]'")
    workload = WORKLOADS[options.workload]
    impl = IMPLEMENTATIONS[options.implementation]
    first_row = impl.first_row
    driver = Driver()
    with (
        tempfile.TemporaryDirectory() as tmp,
        _db.bench_database(options.tasks, [first_row or 0]) as database,
        start_workers(driver, workload, [options.implementation], database) as (workers, errors),
    ):
        if errors:
            raise SystemExit(errors[options.implementation])
        worker = workers[options.implementation]
        driver.batch(worker, impl, options.tasks, workload.wait, 300, database=database)  # warm
        raw = options.raw or Path(tmp) / "stacks.txt"
        command = [
            py_spy, "record", "--pid", str(worker.process.pid), "--rate", str(options.rate),
            "--subprocesses", "--threads", "--gil", "--format", "raw", "--output", str(raw),
        ]  # fmt: skip
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(options.batches):
                sample, error = driver.batch(
                    worker, impl, options.tasks, workload.wait, 300, database=database
                )
                rate, cpu = sample.tasks_per_s, sample.cpu_ms_per_task
                print(f"{rate:.0f} tasks/s, {cpu:.2f} ms CPU per task", error or "")
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        print(summarise(raw, options.top))


if __name__ == "__main__":
    main()
