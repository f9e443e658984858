"""pytest fixtures for testing ``AsyncSessionTask`` tasks (entry point ``pytest11``).

Define ``async_session_app`` in your ``conftest.py`` to return your Celery app; then:

* ``async_session_rollback``: in-process runs (``apply()``, eager mode) whose sessions share
  one connection per database, rolled back after the test
  (``async_session_task.testing.rollback_sessions``).
* ``async_session_worker``: a real ``celery worker`` subprocess for the app
  (``async_session_task.testing.worker_process``), stopped after the test, which fails
  if the worker did not shut down cleanly. Override ``async_session_worker_parameters``
  to choose the module (``celery -A``), pool, concurrency, environment.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest

from .testing import RollbackSessions, WorkerProcess, rollback_sessions, worker_process


@pytest.fixture
def async_session_app() -> Any:
    """Your Celery app: override this fixture in your ``conftest.py``."""
    pytest.fail(
        "Define a fixture named async_session_app in your conftest.py that returns the "
        "Celery app whose tasks the async_session_* fixtures should use.",
        pytrace=False,
    )


@pytest.fixture
def async_session_rollback(async_session_app: Any) -> Iterator[RollbackSessions]:
    """Eager runs of the app's tasks, on connections rolled back after the test."""
    with rollback_sessions(async_session_app) as scope:
        yield scope


@pytest.fixture
def async_session_worker_parameters() -> dict[str, Any]:
    """Keyword arguments for ``worker_process``; ``module`` is the ``celery -A`` argument.

    Default: ``{}``, which runs ``celery -A <app.main>`` on the prefork pool with two
    processes. Override it, e.g. ``{"module": "shop.worker", "pool": "threads"}``.
    """
    return {}


@pytest.fixture
def async_session_worker(
    async_session_app: Any, async_session_worker_parameters: dict[str, Any]
) -> Iterator[WorkerProcess]:
    """A real ``celery worker`` running the app; send tasks with ``worker.send(task, ...)``."""
    parameters = dict(async_session_worker_parameters)
    module = parameters.pop("module", None) or _module_of(async_session_app)
    with worker_process(async_session_app, module, **parameters) as worker:
        yield worker
        code = worker.stop()
        problems = worker.shutdown_problems()
        if code != 0 or problems:
            pytest.fail(
                f"worker {worker.nodename} did not shut down cleanly (exit code {code}): "
                f"{problems}\n{worker.log[-4000:]}",
                pytrace=False,
            )


def _module_of(app: Any) -> str:
    """``app.main`` when it names a module that holds the app (as ``celery -A`` needs)."""
    main = getattr(app, "main", None)
    try:
        module = importlib.import_module(main) if main else None
    except ImportError:
        module = None
    if module is None or not any(value is app for value in vars(module).values()):
        pytest.fail(
            f"Cannot tell which module holds the Celery app {app!r} (app.main is {main!r}): "
            'override async_session_worker_parameters to return {"module": "pkg.module"}.',
            pytrace=False,
        )
    return str(main)
