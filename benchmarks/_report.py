"""The results as a terminal table, the targets they are judged by, and the docs page."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import _machine, _stats
from benchmarks._variants import BASELINES, FACTORS, IMPLEMENTATIONS

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COLUMNS = (
    "workload",
    "implementation",
    "tasks/s",
    "CPU ms/task",
    "main + children",
    "CPU vs sync",
    "tasks/s vs sync",
    "CPU vs naive",
    "tasks/s vs naive",
    "CPU vs library defaults",
)


def _label(name: str) -> str:
    impl = IMPLEMENTATIONS.get(name)
    return impl.label if impl else name


def ratios(workload: dict[str, Any]) -> dict[str, Any]:
    """Every implementation against each baseline, paired round by round."""
    impls = workload["implementations"]
    out: dict[str, Any] = {}
    for name, data in impls.items():
        if not data["rounds"]:
            continue  # skipped, or failed before its first batch
        # Each variant of the library against its defaults, too.
        for baseline in (*BASELINES, "library") if name.startswith("library-") else BASELINES:
            # A variant measured with other worker settings (-info, -noresult) is compared
            # with the baseline measured with the same ones, when it ran.
            base = baseline + ("-" + name.rpartition("-")[2] if name.endswith(FACTORS) else "")
            base = base if base in impls else baseline
            if base == name or not impls.get(base, {}).get("rounds"):
                continue
            for metric in ("cpu_ms_per_task", "tasks_per_s"):
                value = _stats.paired(data["rounds"], impls[base]["rounds"], metric)
                out.setdefault(name, {}).setdefault(baseline, {})[metric] = value
    return out


def _ratio(workload: dict[str, Any], name: str, base: str, metric: str) -> Any:
    return workload.get("ratios", {}).get(name, {}).get(base, {}).get(metric)


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per workload and implementation; a failed one says why instead of numbers."""
    out: list[tuple[str, ...]] = []
    for workload in results["workloads"].values():
        impls = workload["implementations"]
        for index, (impl, data) in enumerate(impls.items()):
            title = workload["title"] if index == 0 else ""
            label = _label(impl)
            rate = data.get("tasks_per_s")
            if data["status"] == "skipped":
                out.append((title, label, f"skipped: {data['error']}", *[""] * 7))
                continue
            if not rate:
                out.append((title, label, f"failed: {data['error']}", *[""] * 7))
                continue
            if data["status"] != "ok":
                label += f" (then failed: {data['error']})"
            main, children = data["main_cpu_ms_per_task"], data["children_cpu_ms_per_task"]
            parts = f"{main['median']:.2f} + {children['median']:.2f}"
            if pooler := data.get("pgbouncer_cpu_ms_per_task"):
                parts += f" (PgBouncer: {pooler['median']:.2f})"
            out.append(
                (
                    title,
                    label,
                    _stats.text(rate, 0),
                    _stats.text(data.get("cpu_ms_per_task"), 2),
                    parts,
                    _stats.text(_ratio(workload, impl, "sync", "cpu_ms_per_task"), 2, "x"),
                    _stats.text(_ratio(workload, impl, "sync", "tasks_per_s"), 2, "x"),
                    _stats.text(_ratio(workload, impl, "naive", "cpu_ms_per_task"), 2, "x"),
                    _stats.text(_ratio(workload, impl, "naive", "tasks_per_s"), 2, "x"),
                    _stats.text(_ratio(workload, impl, "library", "cpu_ms_per_task"), 2, "x"),
                )
            )
    return out


def bridge_rows(results: dict[str, Any], section: str = "ways") -> list[tuple[str, ...]]:
    """Rows of the in-process measurements: ``ways`` (trivial body) or ``db`` (DB body);
    the trivial ways end with the task calls of a process that runs its loop inline."""
    bridge = results.get("bridge")
    if not bridge:
        return []
    if "error" in bridge:
        return [("bridge", f"failed: {bridge['error']}", "")]
    ways = [(way["what"], way) for way in bridge.get(section, {}).values()]
    inline = bridge.get("inline") or {}
    if section == "ways" and "error" in inline:
        return [*map(_way_row, ways), ("loop inline", f"failed: {inline['error']}", "")]
    inline_names = {
        "ways": ("task_call", "task_apply"),
        "db": ("library_call", "library_apply", "library_run_sync"),
    }[section]
    if inline.get(section):
        ways += [
            (
                f"{inline[section][name]['what']}, loop inline (prefork child, solo)",
                inline[section][name],
            )
            for name in inline_names
            if name in inline[section]
        ]
        # Measured only there: the statements of the DB body, sent by each driver alone.
        ways += [
            (inline[section][name]["what"], inline[section][name])
            for name in ("asyncpg_alone", "psycopg_alone")
            if name in inline[section]
        ]
    return [_way_row(way) for way in ways]


SWITCH_COLUMNS = ("way to run get + change + commit in process", "greenlet switches per run")


def switch_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Greenlet switches per run of the DB body, counted with ``greenlet.settrace`` in the
    process that runs its loop inline (where every switch is in the calling thread)."""
    db = ((results.get("bridge") or {}).get("inline") or {}).get("db") or {}
    return [(way["what"], f"{way['switches']:.1f}") for way in db.values() if "switches" in way]


GAP_COLUMNS = ("what differs, CPU per run of the DB body (loop inline)", "us", "share")

#: (what, ways added, ways taken away): each part of the gap between the library through
#: Celery's tracer and the sync pattern through it, from the medians of one process.
GAP_PARTS = (
    ("the driver and the event loop: asyncpg on asyncio against psycopg 3, no SQLAlchemy",
     ("asyncpg_alone",), ("psycopg_alone",)),
    ("SQLAlchemy's asyncio layer over asyncpg against its sync API over psycopg 3, "
     "beyond the drivers", ("asyncio", "psycopg_alone"), ("sync", "asyncpg_alone")),
    ("the task base around the body, through Celery's tracer: the library with its defaults "
     "(pre-ping included) against the sync pattern's", ("library_apply", "sync"),
     ("asyncio", "sync_apply")),
)  # fmt: skip


def gap_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Where the CPU per run goes between ``library_apply`` and ``sync_apply``, loop inline:
    differences of per-way medians measured in alternating rounds of one process."""
    db = ((results.get("bridge") or {}).get("inline") or {}).get("db") or {}
    needed = {name for _, added, taken in GAP_PARTS for name in (*added, *taken)}
    if not needed <= db.keys():
        return []
    cpu = {name: way["cpu_median"] for name, way in db.items()}
    total = cpu["library_apply"] - cpu["sync_apply"]
    out: list[tuple[str, ...]] = []
    for what, added, taken in GAP_PARTS:
        part = sum(cpu[name] for name in added) - sum(cpu[name] for name in taken)
        out.append((what, f"{part:.0f}", f"{part / total:.0%}" if total > 0 else "-"))
    out.append(("in all: task.apply() of the library against the sync pattern's", f"{total:.0f}",
                f"{cpu['library_apply'] / cpu['sync_apply']:.2f}x"))  # fmt: skip
    return out


def _way_row(named: tuple[str, dict[str, Any]]) -> tuple[str, ...]:
    what, way = named
    return (
        what,
        f"{way['median']:.1f} ({way['min']:.1f}-{way['max']:.1f})",
        f"{way['cpu_median']:.1f} ({way['cpu_min']:.1f}-{way['cpu_max']:.1f})",
    )


BRIDGE_COLUMNS = ("way to run a trivial async body", "us per call", "CPU us per call")
DB_COLUMNS = ("way to run the DB body in process", "us per call", "CPU us per call")


#: The targets: (name, workload, implementation, against, metric, goal, at least?).
RATIO_TARGETS = (
    ("DB prefork: CPU per task vs sync pattern", "db-prefork", "sync", "cpu_ms_per_task", 1.05),
    ("DB prefork: tasks/s vs naive asyncio.run", "db-prefork", "naive", "tasks_per_s", 3.5),
    ("IO threads -c 32: tasks/s vs sync pattern", "io-threads", "sync", "tasks_per_s", 1.0),
    ("IO gevent -c 100: tasks/s vs sync pattern", "io-gevent", "sync", "tasks_per_s", 1.0),
)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The library with its defaults against the targets, on the median of paired ratios."""
    out: list[dict[str, Any]] = []
    for name, workload, other, metric, goal in RATIO_TARGETS:
        measured = results["workloads"].get(workload)
        paired = _ratio(measured, "library", other, metric) if measured else None
        at_least = metric == "tasks_per_s"
        met = None
        if paired is not None:
            met = paired["median"] >= goal if at_least else paired["median"] <= goal
        out.append(
            {
                "name": name,
                "target": f"{'>=' if at_least else '<='} {goal}x",
                "measured": "not measured" if paired is None else _ratio_text(paired),
                "met": met,
                "value": paired,
            }
        )
    bridge = results.get("bridge") or {}
    for mode, measured in (("loop thread", bridge), ("loop inline", bridge.get("inline") or {})):
        overhead = measured.get("overhead_us")
        out.append(
            {
                "name": f"Bridge overhead per call, {mode} (task(x) minus await body)",
                "target": "<= 30 us",
                "measured": "not measured"
                if overhead is None
                else f"{overhead:.1f} us ({measured['call_overhead_us']:.1f} us over a sync "
                "task(x))",
                "met": None if overhead is None else overhead <= 30,
                "value": overhead,
            }
        )
    return out


def _ratio_text(paired: dict[str, float]) -> str:
    return (
        f"{paired['median']:.2f}x [IQR {paired['q1']:.2f}-{paired['q3']:.2f}, "
        f"min-max {paired['min']:.2f}-{paired['max']:.2f}, {paired['n']} rounds]"
    )


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def _markdown_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def tables(results: dict[str, Any]) -> list[str]:
    """Every table that has rows, under its heading: workers, in process, targets."""
    sections: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = [
        ("Workers", COLUMNS, rows(results)),
        ("Bridge", BRIDGE_COLUMNS, bridge_rows(results)),
        ("The DB body in one process", DB_COLUMNS, bridge_rows(results, "db")),
        ("Where the gap goes", GAP_COLUMNS, gap_rows(results)),
        ("Greenlet switches", SWITCH_COLUMNS, switch_rows(results)),
        (
            "Targets",
            ("target", "goal", "measured", "verdict"),
            [
                (t["name"], t["target"], t["measured"], _verdict(t["met"]))
                for t in results["targets"]
            ],
        ),
    ]
    return [
        f"### {heading}\n\n"
        + ("The library with its defaults. Ratios are the median of per-round ratios (both "
           "batches ran in the same round), with their interquartile range and min-max.\n\n"
           if heading == "Targets" else "")
        + _markdown_table(columns, body)
        for heading, columns, body in sections
        if body
    ]  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """The terminal report: the tables of the docs page."""
    return "\n\n".join(tables(results))


def generated_section(results: dict[str, Any]) -> str:
    settings = results["settings"]
    when = results.get("measured_at") or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        f"Measured {when} in {results['duration_s']:.0f} s: {settings['rounds']} rounds of "
        f"{settings['tasks']} tasks per DB batch, {settings.get('io_rounds')} rounds of "
        f"{settings['io_tasks']} per IO-bound batch and of {settings['bridge_calls']} calls "
        "in process; the other workers "
        + ("stopped" if settings.get("paused", True) else "left running (idle)")
        + " while one was measured. Each cell: median [interquartile range] over rounds; "
        "ratios are medians of per-round ratios (both batches in the same round). The machine "
        "is shared with other test runs: absolute figures are noisy, ratios much less."
    )
    machine = "### Machine\n\n" + _machine.text(results)
    return "\n\n".join([BEGIN + "\n" + intro, machine, *tables(results)]) + "\n" + END


def write_docs(results: dict[str, Any], docs: Path) -> list[Path]:
    """Refresh the generated part of ``performance.md``.

    Only the text between the ``bench`` markers is replaced, so what is written around it
    by hand (the analysis of the numbers) stays.
    """
    docs.mkdir(parents=True, exist_ok=True)
    page = docs / "performance.md"
    section = generated_section(results)
    if page.exists() and BEGIN in (text := page.read_text()) and END in text:
        head, _, rest = text.partition(BEGIN)
        text = head + section + rest.partition(END)[2]
    else:
        text = f"# Performance\n\nRun `nox -s bench` to measure again.\n\n{section}\n"
    page.write_text(text)
    return [page]
