"""An app whose tasks are misconfigured one way each, for a real worker.

Every URL carries the password in ``AST_SECRET_PASSWORD`` (the local PostgreSQL trusts
127.0.0.1 and ignores it), so the worker's log and results can be searched for it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from async_session_task import AsyncSessionTask

PASSWORD = os.environ.get("AST_SECRET_PASSWORD", "not-set")
_database = make_url(os.environ.get("AST_DATABASE_URL", "postgresql+asyncpg://root@127.0.0.1/t"))
_secret = _database.set(password=PASSWORD)


def url(**changes: Any) -> str:
    """The test database's URL with the password in clear, changed as given."""
    return _secret.set(**changes).render_as_string(hide_password=False)


app = Celery(
    "misconfigured_app",
    broker=os.environ.get("AST_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("AST_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def _task(name: str, **options: Any) -> Any:
    @app.task(
        bind=True, base=AsyncSessionTask, name=f"misconfigured.{name}", shared=False, **options
    )
    async def task(self: AsyncSessionTask) -> Any:
        return await self.session.scalar(text("select 1"))

    return task


#: Each broken task, and a part of the message its every run fails with.
EXPECTED = {
    "missing": "has no database: set app.conf.async_session_url",
    "sync_driver": "uses 'psycopg2', a sync driver; use 'postgresql+asyncpg://'",
    "bare_driver": "names no driver; use 'postgresql+asyncpg://'",
    "malformed": "async_session_url is not a database URL",
    "unknown_driver": "SQLAlchemy has no driver 'postgresql+nodriver'",
    "bad_engine_option": "Invalid argument(s) 'pool_sizee'",
    "bad_session_option": "async_session_options has 'expire_on_comit'",
    "unresolvable_maker": "does not resolve (ModuleNotFoundError",
    "not_a_maker": "must be a sqlalchemy.ext.asyncio.async_sessionmaker, got Celery",
    "both": "has both async_session_url and async_session_maker set",
}
_BROKEN = {
    "missing": _task("missing"),
    "sync_driver": _task("sync_driver", async_session_url=url(drivername="postgresql+psycopg2")),
    "bare_driver": _task("bare_driver", async_session_url=url(drivername="postgresql")),
    "malformed": _task(
        "malformed", async_session_url=f"postgresql+asyncpg://root:{PASSWORD}@127.0.0.1:port/db"
    ),
    "unknown_driver": _task(
        "unknown_driver", async_session_url=url(drivername="postgresql+nodriver")
    ),
    "bad_engine_option": _task(
        "bad_engine_option",
        async_session_url=url(),
        async_session_engine_options={"pool_sizee": 1},
    ),
    "bad_session_option": _task(
        "bad_session_option",
        async_session_url=url(),
        async_session_options={"expire_on_comit": False},
    ),
    "unresolvable_maker": _task("unresolvable_maker", async_session_maker="tests.apps.nope:Maker"),
    "not_a_maker": _task("not_a_maker", async_session_maker="tests.apps.misconfigured_app:app"),
    "both": _task(
        "both", async_session_url=url(), async_session_maker="tests.apps.maker_app:SessionLocal"
    ),
}

#: Valid settings, unreachable database: the run fails when it first connects.
UNREACHABLE = {
    "refused": _task("refused", async_session_url=url(port=1)),
    "unknown_host": _task("unknown_host", async_session_url=url(host="no-such-host.invalid")),
}


def broken_tasks() -> dict[str, Any]:
    return dict(_BROKEN)


@app.task(
    bind=True,
    base=AsyncSessionTask,
    async_session_url=url(),
    name="misconfigured.connects",
    shared=False,
)
async def connects(self: AsyncSessionTask) -> dict[str, Any]:
    """A valid task: what SQLAlchemy and the library show of the URL."""
    bind = self.session.bind
    assert isinstance(bind, AsyncEngine)
    return {
        "user": await self.session.scalar(text("select current_user")),
        "engine": repr(bind.sync_engine),
        "url": str(bind.url),
    }
