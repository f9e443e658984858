"""Where the examples find their database and their broker.

From the environment, so the same code runs on PostgreSQL and Redis:
``EXAMPLES_DATABASE_URL`` (an asyncio URL, e.g. ``postgresql+asyncpg://user@host/db``),
``EXAMPLES_BROKER_URL`` and ``EXAMPLES_RESULT_BACKEND`` (default: the broker URL),
``EXAMPLES_QUEUE`` (default: ``celery``). Without them nothing needs to be running: SQLite and
a broker made of files, in ``EXAMPLES_STATE_DIR`` (default: a folder in the temp directory).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from async_session_task.testing import file_broker_settings

STATE_DIR = Path(
    os.environ.get("EXAMPLES_STATE_DIR") or Path(tempfile.gettempdir(), "async-session-examples")
)
DATABASE_URL = (
    os.environ.get("EXAMPLES_DATABASE_URL") or f"sqlite+aiosqlite:///{STATE_DIR / 'examples.db'}"
)


def celery_settings() -> dict[str, Any]:
    """Broker, result backend and queue for ``app.conf.update(...)``."""
    common = {
        "task_default_queue": os.environ.get("EXAMPLES_QUEUE") or "celery",
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    broker = os.environ.get("EXAMPLES_BROKER_URL")
    if broker:
        backend = os.environ.get("EXAMPLES_RESULT_BACKEND") or broker
        return {**common, "broker_url": broker, "result_backend": backend}
    return {**common, **file_broker_settings(STATE_DIR)}


async def create_tables(metadata: MetaData) -> None:
    """Create the tables of ``metadata`` (what a migration tool does in a real project)."""
    engine = create_async_engine(DATABASE_URL)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await engine.dispose()
