"""The ``conftest.py`` of a project whose tasks are ``examples/shop``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from celery import Celery

from examples import settings
from examples.shop import models, tasks


@pytest.fixture(scope="session", autouse=True)
def tables() -> None:
    asyncio.run(settings.create_tables(models.Base.metadata))  # or: alembic upgrade head


@pytest.fixture
def async_session_app() -> Celery:
    """The app whose tasks the async_session_* fixtures run."""
    return tasks.app


@pytest.fixture
def async_session_worker_parameters() -> dict[str, Any]:
    """How async_session_worker starts ``celery worker``."""
    return {"module": "examples.shop.tasks", "pool": "threads", "concurrency": 2}
