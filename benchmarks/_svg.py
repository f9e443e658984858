"""The plot of ``docs/performance.md``: bar charts drawn as plain SVG.

Written by hand rather than with a plotting library: the file stays small, diffs as text,
and the benchmark needs nothing beyond what the workers need.
"""

from __future__ import annotations

from html import escape
from typing import Any

COLORS = {
    "library": "#2b6cb0",
    "sync": "#dd6b20",
    "naive": "#718096",
    "noop": "#a0aec0",
    "asyncio": "#718096",
}
WIDTH, HEIGHT, TOP, BOTTOM, LEFT = 300, 230, 40, 50, 50


def _panel(
    x0: float,
    y0: float,
    title: str,
    bars: list[tuple[str, str, dict[str, float] | None]],
    width: float = WIDTH,
) -> list[str]:
    """One chart: ``bars`` are (label, colour, {median, min, max} or None when it failed).

    The scale follows the medians; a whisker longer than the chart is cut at its top.
    """
    out = [f'<text x="{x0 + width / 2}" y="{y0 + 20}" class="title">{escape(title)}</text>']
    medians = [v["median"] for _, _, v in bars if v]
    top = max(medians, default=1.0) * 1.35 or 1.0
    plot_h = HEIGHT - TOP - BOTTOM
    base = y0 + TOP + plot_h
    out.append(
        f'<line x1="{x0 + LEFT}" y1="{base}" x2="{x0 + width - 10}" y2="{base}" class="axis"/>'
    )
    slot = (width - LEFT - 10) / max(len(bars), 1)
    for index, (label, color, value) in enumerate(bars):
        x = x0 + LEFT + index * slot + slot * 0.15
        w = slot * 0.7
        centre = x + w / 2
        out.append(f'<text x="{centre:.1f}" y="{base + 14}" class="label">{escape(label)}</text>')
        if value is None:
            out.append(f'<text x="{centre:.1f}" y="{base - 6}" >failed</text>')
            continue
        h = plot_h * value["median"] / top
        out.append(
            f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{w:.1f}" height="{h:.1f}" '
            f'fill="{color}"/>'
        )
        low, high = (base - plot_h * min(value[k], top) / top for k in ("min", "max"))
        out.append(
            f'<line x1="{centre:.1f}" y1="{low:.1f}" x2="{centre:.1f}" y2="{high:.1f}" '
            'class="spread"/>'
        )
        text = f"{value['median']:.3g}" if value["median"] < 10 else f"{value['median']:.0f}"
        label_y = min(high, base - h) - 4
        out.append(f'<text x="{centre:.1f}" y="{label_y:.1f}">{text}</text>')
    return out


SHORT = {"library": "library", "sync": "sync", "naive": "naive", "noop": "no-op"}


def _short(name: str) -> str:
    """``library-uvloop`` -> ``uvloop``: the variant, under a panel that says library."""
    return SHORT.get(name) or name.removeprefix("library-")


BRIDGE_SHORT = {
    "await": "await",
    "run_until_complete": "loop.run",
    "thread_hop": "thread hop",
    "task_call": "task()",
    "noop_call": "sync task()",
    "task_apply": "task.apply",
    "noop_apply": "sync .apply",
}


DB_SHORT = {
    "asyncio": "plain asyncio",
    "library_call": "library task()",
    "library_apply": "library .apply",
    "sync": "plain sync",
    "sync_apply": "sync pattern .apply",
    "asyncio_run_sync": "asyncio run_sync",
    "library_run_sync": "library run_sync",
}


def _cpu(way: dict[str, Any]) -> dict[str, float]:
    return {"median": way["cpu_median"], "min": way["cpu_min"], "max": way["cpu_max"]}


def plot(results: dict[str, Any]) -> str:
    """Row 1: tasks/s per workload; row 2: CPU ms per task; row 3: the bridge, us per call."""
    parts: list[str] = []
    workloads = list(results["workloads"].values())
    x = 0.0
    for workload in workloads:
        impls = workload["implementations"]
        width = max(WIDTH, LEFT + 52 * len(impls))
        for row, (metric, unit) in enumerate(
            (("tasks_per_s", "tasks/s"), ("cpu_ms_per_task", "CPU ms per task"))
        ):
            bars = [
                (_short(name), COLORS.get(name.partition("-")[0], "#999"), data.get(metric))
                for name, data in impls.items()
                if data["status"] != "skipped"
            ]
            parts += _panel(x, row * HEIGHT, f"{workload['title']}: {unit}", bars, width)
        x += width
    rows = 2 if workloads else 0
    bridge = results.get("bridge") or {}
    if "ways" in bridge:
        bars = [
            (
                BRIDGE_SHORT.get(name, name),
                COLORS["library"] if name.startswith("task") else "#a0aec0",
                way,
            )
            for name, way in bridge["ways"].items()
        ]
        parts += _panel(
            0, rows * HEIGHT, "Bridge: us per call of a trivial async body", bars, WIDTH * 3
        )
        rows += 1
    if "db" in bridge:
        bars = [
            (DB_SHORT.get(name, name), COLORS[name.partition("_")[0]], _cpu(way))
            for name, way in bridge["db"].items()
        ]
        title = "The DB body in one process: CPU us per call"
        parts += _panel(0, rows * HEIGHT, title, bars, WIDTH * 3)
        rows += 1
    total_width = max(x, WIDTH * 3)
    height = HEIGHT * max(rows, 1)
    style = (
        "text{font-family:sans-serif;font-size:11px;text-anchor:middle;fill:#1a202c}"
        ".title{font-size:12px;font-weight:bold}.label{font-size:10px}"
        ".axis{stroke:#4a5568}.spread{stroke:#1a202c;stroke-width:1.5}"
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width:.0f}" '
            f'height="{height}" viewBox="0 0 {total_width:.0f} {height}">',
            f"<style>{style}</style>",
            f'<rect width="{total_width:.0f}" height="{height}" fill="white"/>',
            *parts,
            "</svg>",
            "",
        ]
    )
