"""The results as a terminal table, the targets they are judged by, and the docs page + plot."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import _svg

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LABELS = {
    "library": "async_session_task",
    "sync": "sync pattern",
    "naive": "naive asyncio.run",
    "noop": "no-op (Celery alone)",
}
COLUMNS = ("workload", "implementation", "tasks/s", "CPU ms/task", "peak RSS MB", "vs sync")


def _spread(metric: dict[str, float] | None, digits: int) -> str:
    if not metric:
        return "-"
    return f"{metric['median']:.{digits}f} ({metric['min']:.{digits}f}-{metric['max']:.{digits}f})"


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per workload and implementation; a failed one says why instead of numbers."""
    out: list[tuple[str, ...]] = []
    for workload in results["workloads"].values():
        impls = workload["implementations"]
        sync_rate = (impls.get("sync", {}).get("tasks_per_s") or {}).get("median")
        for index, (impl, data) in enumerate(impls.items()):
            title = workload["title"] if index == 0 else ""
            label = LABELS.get(impl, impl)
            rate = data.get("tasks_per_s")
            if not rate:
                status = "not supported yet" if impl == "library" else "failed"
                out.append((title, label, f"{status}: {data['error']}", "", "", ""))
                continue
            if data["status"] != "ok":
                label += f" (then failed: {data['error']})"
            out.append(
                (
                    title,
                    label,
                    _spread(rate, 0),
                    _spread(data.get("cpu_ms_per_task"), 2),
                    f"{data['peak_rss_mb']['median']:.0f}",
                    f"{rate['median'] / sync_rate:.2f}x" if sync_rate else "-",
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
    if section == "ways" and inline:
        ways += [
            (
                f"{inline['ways'][name]['what']}, loop inline (prefork child, solo)",
                inline["ways"][name],
            )
            for name in ("task_call", "task_apply")
        ]
    return [_way_row(way) for way in ways]


def _way_row(named: tuple[str, dict[str, Any]]) -> tuple[str, ...]:
    what, way = named
    return (
        what,
        f"{way['median']:.1f} ({way['min']:.1f}-{way['max']:.1f})",
        f"{way['cpu_median']:.1f} ({way['cpu_min']:.1f}-{way['cpu_max']:.1f})",
    )


BRIDGE_COLUMNS = ("way to run a trivial async body", "us per call", "CPU us per call")
DB_COLUMNS = ("way to run the DB body in process", "us per call", "CPU us per call")


def _paired(results: dict[str, Any], workload: str, a: str, b: str, metric: str) -> Any:
    """Per-round ratios a/b (the two ran in the same round, back to back): median, min, max."""
    impls = results["workloads"].get(workload, {}).get("implementations", {})
    if a not in impls or b not in impls:
        return None
    pairs = [
        x[metric] / y[metric]
        for x, y in zip(impls[a]["rounds"], impls[b]["rounds"], strict=False)
        if x["failed"] == 0 and y["failed"] == 0 and y[metric]
    ]
    if not pairs:
        return None
    return {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}


#: The issue's ratio targets: (name, workload, library vs which, metric, goal, at least?).
RATIO_TARGETS = (
    ("DB prefork: tasks/s vs sync pattern", "db-prefork", "sync", "tasks_per_s", 1.15, True),
    (
        "DB prefork: CPU per task vs sync pattern",
        "db-prefork",
        "sync",
        "cpu_ms_per_task",
        1.0,
        False,
    ),
    ("DB prefork: tasks/s vs naive asyncio.run", "db-prefork", "naive", "tasks_per_s", 3.5, True),
    ("IO gevent -c 100: tasks/s vs sync pattern", "io-gevent", "sync", "tasks_per_s", 1.2, True),
)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets; ratios are judged on the median of per-round paired ratios."""
    out: list[dict[str, Any]] = []
    for name, workload, other, metric, goal, at_least in RATIO_TARGETS:
        paired = _paired(results, workload, "library", other, metric)
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
    for workload in results["workloads"].values():
        impls = workload["implementations"]
        lib, sync = impls.get("library", {}), impls.get("sync", {})
        if lib.get("peak_rss_mb") and sync.get("peak_rss_mb"):
            extra = lib["peak_rss_mb"]["median"] - sync["peak_rss_mb"]["median"]
            out.append(
                {
                    "name": f"{workload['title']}: peak RSS vs sync pattern",
                    "target": "<= +10 MB",
                    "measured": f"{extra:+.1f} MB",
                    "met": extra <= 10,
                    "value": extra,
                }
            )
    return out


def _ratio_text(paired: dict[str, float]) -> str:
    return f"{paired['median']:.2f}x ({paired['min']:.2f}-{paired['max']:.2f})"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def _text_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *body)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """The terminal report: workloads, bridge, targets."""
    parts = [_text_table(COLUMNS, rows(results))]
    if bridge := bridge_rows(results):
        parts.append(_text_table(BRIDGE_COLUMNS, bridge))
    if db := bridge_rows(results, "db"):
        parts.append(_text_table(DB_COLUMNS, db))
    parts.append(
        _text_table(
            ("target", "goal", "measured", "verdict"),
            [
                (t["name"], t["target"], t["measured"], _verdict(t["met"]))
                for t in results["targets"]
            ],
        )
    )
    return "\n\n".join(parts)


def _machine_text(results: dict[str, Any]) -> str:
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
            f"PostgreSQL {machine['postgresql']}, Redis {machine['redis']}",
            f"- Packages: {packages}; library source: {machine.get('source', 'unknown')}",
            f"- Load average (1, 5, 15 min) before the run: {before}; after: {after}",
        ]
    )


def generated_section(results: dict[str, Any], plot_name: str) -> str:
    settings = results["settings"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        BEGIN,
        f"Measured {when} in {results['duration_s']:.0f} s: {settings['rounds']} rounds, "
        f"{settings['tasks']} tasks per DB batch, {settings['io_tasks']} per IO-bound batch, "
        f"{settings['bridge_calls']} calls per bridge round. "
        "Each cell: median (min-max over rounds).",
        "",
        "### Machine",
        "",
        _machine_text(results),
    ]
    if workers := rows(results):
        parts += ["", "### Workers", "", _markdown_table(COLUMNS, workers)]
    parts += ["", f"![median per implementation; lines: min-max over rounds]({plot_name})"]
    if bridge := bridge_rows(results):
        parts += [
            "",
            "### Bridge",
            "",
            _markdown_table(BRIDGE_COLUMNS, bridge),
        ]
    if db := bridge_rows(results, "db"):
        parts += ["", "### The DB body in one process", "", _markdown_table(DB_COLUMNS, db)]
    parts += [
        "",
        "### Targets",
        "",
        "Ratios are the median of per-round ratios (the two implementations ran back to back in "
        "each round), with their min-max.",
        "",
        _markdown_table(
            ("target", "goal", "measured", "verdict"),
            [
                (t["name"], t["target"], t["measured"], _verdict(t["met"]))
                for t in results["targets"]
            ],
        ),
        END,
    ]
    return "\n".join(parts)


def write_docs(results: dict[str, Any], docs: Path) -> list[Path]:
    """Write the plot and refresh the generated part of ``performance.md``.

    Only the text between the ``bench`` markers is replaced, so what is written around it
    by hand (the analysis of the numbers) stays.
    """
    docs.mkdir(parents=True, exist_ok=True)
    plot = docs / "performance.svg"
    plot.write_text(_svg.plot(results))
    page = docs / "performance.md"
    section = generated_section(results, plot.name)
    if page.exists() and BEGIN in (text := page.read_text()) and END in text:
        head, _, rest = text.partition(BEGIN)
        text = head + section + rest.partition(END)[2]
    else:
        text = f"# Performance\n\nRun `nox -s bench` to measure again.\n\n{section}\n"
    page.write_text(text)
    return [page, plot]
