"""What a batch measured, its spread over rounds, and ratios paired round by round."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """Median, quartiles (IQR) and min-max of ``values``; None when there are none."""
    if not values:
        return None
    q1, _, q3 = (
        statistics.quantiles(values, n=4, method="inclusive")
        if len(values) > 1
        else (values[0],) * 3
    )
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def paired(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], metric: str) -> Any:
    """Per-round ratios a/b of ``metric`` (both measured in the same round): their spread.

    Only rounds where both batches succeeded count; a round is the ``round`` field of a
    sample, so an implementation that stopped early pairs with the rounds it ran.
    """
    by_round = {s["round"]: s for s in b if s["failed"] == 0 and s[metric]}
    ratios = [
        s[metric] / by_round[s["round"]][metric]
        for s in a
        if s["failed"] == 0 and s["round"] in by_round
    ]
    result: dict[str, Any] | None = spread(ratios)
    if result is not None:
        result["rounds"] = ratios
    return result


def text(value: dict[str, float] | None, digits: int, suffix: str = "") -> str:
    """``median [q1-q3]``, the form every table uses."""
    if not value:
        return "-"
    return (
        f"{value['median']:.{digits}f}{suffix} [{value['q1']:.{digits}f}-{value['q3']:.{digits}f}]"
    )


@dataclass
class Sample:
    """One batch of one implementation."""

    round: int
    tasks_per_s: float
    cpu_ms_per_task: float
    main_cpu_ms_per_task: float  #: the worker's main process (consumer, pool dispatch)
    children_cpu_ms_per_task: float  #: its pool children (prefork); 0 on other pools
    idle_cpu_ms_per_task: float  #: what the other, idle workers used meanwhile
    pgbouncer_cpu_ms_per_task: float  #: what the PgBouncer it connects through used, if any
    peak_rss_mb: float
    pss_mb: float
    wall_s: float
    succeeded: int
    failed: int


METRICS = ("tasks_per_s", "cpu_ms_per_task", "main_cpu_ms_per_task", "children_cpu_ms_per_task")


@dataclass
class Outcome:
    """Everything one implementation did in one workload."""

    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    succeeded: int = 0
    error: str | None = None  #: why it stopped being measured, if it did
    skipped: str | None = None  #: why it was not run at all, if so
    db_check: str | None = None  #: "ok", or what the counters say instead

    def summary(self) -> dict[str, Any]:
        status = "ok" if self.error is None else "failed"
        out: dict[str, Any] = {
            "status": "skipped" if self.skipped else status,
            "error": self.skipped or self.error,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "db_check": self.db_check,
            "rounds": [vars(s) for s in self.samples],
        }
        good = [s for s in self.samples if s.failed == 0]
        extra = ("idle_cpu_ms_per_task", "pgbouncer_cpu_ms_per_task", "peak_rss_mb", "pss_mb")
        for metric in (*METRICS, *extra):
            values = [getattr(s, metric) for s in good]
            if metric == "pgbouncer_cpu_ms_per_task" and not any(values):
                continue  # it does not connect through PgBouncer
            if value := spread(values):
                out[metric] = value
        return out
