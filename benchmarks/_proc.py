"""CPU time and memory of a worker's process tree, read from ``/proc`` (Linux)."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    text = (_PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces; every field after it is numeric.
    return text[text.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                parent = int(_stat_fields(int(entry.name))[1])
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@dataclass(frozen=True)
class Cpu:
    """User + system CPU seconds of a worker's tree: its main process, and the rest."""

    main: float
    children: float  #: pool children, including those that exited and were reaped

    @property
    def total(self) -> float:
        return self.main + self.children

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.main - other.main, self.children - other.children)


def cpu(pid: int) -> Cpu:
    """CPU of ``pid`` (all its threads) and of its descendants, from ``/proc``."""
    main = children = 0
    for index, member in enumerate(tree(pid)):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        # utime, stime are fields 14, 15; cutime, cstime 16, 17 (1-based, see proc(5)).
        if index == 0:
            main += int(fields[11]) + int(fields[12])
            children += int(fields[13]) + int(fields[14])
        else:
            children += int(fields[11]) + int(fields[12])
    return Cpu(main / _TICKS, children / _TICKS)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the tree, including children that already exited and were reaped."""
    return cpu(pid).total


def pause(pids: list[int], paused: bool) -> None:
    """Stop (SIGSTOP) or continue (SIGCONT) the trees of these workers."""
    for pid in pids:
        for member in tree(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGSTOP if paused else signal.SIGCONT)


@dataclass(frozen=True)
class Memory:
    peak_rss_mb: float  #: the largest peak RSS (VmHWM) of one process of the tree
    pss_mb: float  #: proportional set size of the whole tree now (shared pages split)


def memory(pid: int) -> Memory:
    peak, pss = 0, 0
    for member in tree(pid):
        try:
            status = (_PROC / str(member) / "status").read_text()
            rollup = (_PROC / str(member) / "smaps_rollup").read_text()
        except OSError:
            continue
        peak = max(peak, _kib(status, "VmHWM:"))
        pss += _kib(rollup, "Pss:")
    return Memory(peak / 1024, pss / 1024)


def _kib(text: str, field: str) -> int:
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` (a worker this benchmark started) and its descendants."""
    for member in reversed(tree(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
