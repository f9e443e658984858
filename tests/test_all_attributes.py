"""``__all__`` of each public module names exactly its public objects: those defined in it or
in its private submodules (names it merely imports from elsewhere in the package are not)."""

from __future__ import annotations

import sys
import types
from typing import TypeVar

import pytest

import async_session_task
import async_session_task.testing


@pytest.mark.parametrize("module", [async_session_task, async_session_task.testing])
def test_all_names_the_public_objects(module: types.ModuleType) -> None:
    own = {module.__name__} | {
        name for name in sys.modules if name.startswith(f"{module.__name__}._")
    }
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType | TypeVar)
        and getattr(value, "__module__", None) in own
    }
    assert sorted(module.__all__) == sorted(public)


def test_the_package_names() -> None:
    """The public names the docs describe (docs/api.md)."""
    assert sorted(async_session_task.__all__) == [
        "AsyncSessionTask",
        "PublishTimeout",
        "ResultTimeout",
        "aget",
        "apublish",
        "cleanup_runs",
        "current_session",
        "lifespan_state",
        "on_commit",
        "outbox_table",
        "pgbouncer_engine_options",
        "runs_table",
        "task",
    ]


def test_signals_all_names_the_signals() -> None:
    """``async_session_task.signals`` defines signals only (instances of Celery's Signal)."""
    from celery.utils.dispatch import Signal

    import async_session_task.signals

    signals = {
        name
        for name, value in vars(async_session_task.signals).items()
        if isinstance(value, Signal)
    }
    assert sorted(async_session_task.signals.__all__) == sorted(signals) == ["engine_created"]


def test_lifespan_state_is_public() -> None:
    assert "lifespan_state" in async_session_task.__all__
    assert "override_lifespan_state" in async_session_task.testing.__all__
