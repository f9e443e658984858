"""Before: a sync session opened in ``before_start`` and closed in ``after_return``.

Celery skips ``after_return`` after ``self.retry()``, ``Ignore`` and ``Reject``: those runs
leak their session (and its connection) unless cleanup moves elsewhere.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from .models import Customer

app = Celery("crm")
engine = create_engine("postgresql+psycopg://app@127.0.0.1/crm")
SyncSession = sessionmaker(engine)


class DatabaseTask(Task):  # type: ignore[misc]  # celery ships no type information
    abstract = True
    session: Session | None = None

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.session = SyncSession()

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


@app.task(bind=True, base=DatabaseTask)
def customer_id(self: DatabaseTask, email: str) -> int | None:
    assert self.session is not None
    return self.session.scalar(select(Customer.id).where(Customer.email == email))
