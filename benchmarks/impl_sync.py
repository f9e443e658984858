"""The sync pattern: a task base that opens a sync ``Session`` (psycopg) in ``before_start``
and closes it in ``after_return``, on a pooled engine shared by the process."""

from __future__ import annotations

import time
from typing import Any

from celery import Task
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from benchmarks._apps import TASK_NAME, database_url, make_app
from benchmarks._model import Counter

app = make_app("bench_sync")
# Never connected in the prefork parent, so the children start with empty pools.
engine = create_engine(database_url("psycopg"))
SessionLocal = sessionmaker(engine, expire_on_commit=False)


class SyncSessionTask(Task):  # type: ignore[misc]  # celery is untyped
    abstract = True

    @property
    def session(self) -> Session:
        session: Session = self.request.session
        return session

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # The request is per run (and per thread/greenlet), unlike the task object.
        self.request.session = SessionLocal()

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        session = getattr(self.request, "session", None)
        if session is not None:
            session.close()


@app.task(name=TASK_NAME, bind=True, base=SyncSessionTask)
def work(self: SyncSessionTask, row_id: int, wait: float) -> int:
    if wait:
        time.sleep(wait)  # cooperative under -P gevent, which patches time.sleep
    counter = self.session.get(Counter, row_id)
    assert counter is not None, row_id
    counter.value += 1
    self.session.commit()
    return counter.value
