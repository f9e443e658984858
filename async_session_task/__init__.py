"""Celery tasks with ``async def`` bodies and one SQLAlchemy ``AsyncSession`` per run."""

from . import _worker  # noqa: F401  # connects the package's signals and inspect command
from ._calling import PublishTimeout, apublish
from ._decorator import task
from ._lifespan import lifespan_state
from ._marker import cleanup_runs
from ._on_commit import on_commit
from ._pgbouncer import pgbouncer_engine_options
from ._results import ResultTimeout, aget
from ._run import current_session
from ._tables import outbox_table, runs_table
from ._task import AsyncSessionTask

__all__ = [
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
__version__ = "0.1.0"
