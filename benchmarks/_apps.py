"""What every benchmark worker shares: the Celery app, its settings, the database URL.

A worker imports only its own implementation's module, so its memory holds only what that
implementation needs (the no-op worker never imports SQLAlchemy).
"""

from __future__ import annotations

import os

from celery import Celery

#: Every implementation registers its task under this name; the driver sends it by name.
TASK_NAME = "bench.work"
BROKER_URL = os.environ.get("AST_BENCH_BROKER", "redis://127.0.0.1:6379/0")
DEFAULT_DATABASE_URL = "postgresql://root@127.0.0.1:5432/ast_bench"


def database_url(driver: str) -> str:
    """The bench database's URL (``AST_BENCH_DATABASE``) with the given SQLAlchemy driver."""
    url = os.environ.get("AST_BENCH_DATABASE", DEFAULT_DATABASE_URL)
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


def make_app(name: str, *, backend: bool = True) -> Celery:
    """A Celery app on the bench broker; workers store results in Redis for the driver,
    unless ``AST_BENCH_IGNORE_RESULT`` is set (the driver then watches the counters)."""
    app = Celery(name, broker=BROKER_URL, backend=BROKER_URL if backend else None)
    app.conf.update(
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_ignore_result=bool(os.environ.get("AST_BENCH_IGNORE_RESULT")),
    )
    return app
