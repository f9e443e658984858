"""Celery tasks with ``async def`` bodies and one SQLAlchemy ``AsyncSession`` per run."""

from . import _control  # noqa: F401  # registers the inspect command
from ._on_commit import on_commit
from ._session import current_session
from ._task import AsyncSessionTask

__all__ = ["AsyncSessionTask", "current_session", "on_commit"]
__version__ = "0.1.0"
