"""An app on the embedded default: SQLite through aiosqlite, the filesystem broker, file results.

The test process calls :func:`configure` with a folder; its workers get the folder in
``AST_STATE_DIR`` and configure themselves the same way at import.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from sqlalchemy import func, select

from async_session_task import AsyncSessionTask, current_session
from async_session_task.testing import file_broker_settings
from tests.apps.models import Note

app = Celery("tests.apps.sqlite_app", set_as_current=False)


def configure(folder: Path) -> dict[str, str]:
    """Point the app at ``folder``; returns the environment for its workers."""
    app.conf.update(
        file_broker_settings(folder),
        async_session_url=f"sqlite+aiosqlite:///{folder / 'data.db'}",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return {"AST_STATE_DIR": str(folder)}


if os.environ.get("AST_STATE_DIR"):
    configure(Path(os.environ["AST_STATE_DIR"]))


async def count_notes(key: str) -> int:
    count = await current_session().scalar(
        select(func.count()).select_from(Note).where(Note.key == key)
    )
    return int(count or 0)


@app.task(bind=True, base=AsyncSessionTask)
async def add_note(self: AsyncSessionTask, key: str, text: str) -> int:
    """Commits a note; returns how many notes ``key`` has."""
    self.session.add(Note(key=key, text=text))
    await self.session.commit()
    return await count_notes(key)
