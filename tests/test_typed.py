"""Typed tasks at runtime: ``pydantic=True`` returns a dumped model on every pool and eagerly."""

from __future__ import annotations

import pytest

from tests.apps import typed_app
from tests.helpers import StartWorker

WAIT = 90


@pytest.mark.services
@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_pydantic_model_returned_on_worker(start_worker: StartWorker, pool: str) -> None:
    """A model argument is validated and the returned model is dumped for the JSON backend."""
    with start_worker(pool=pool, concurrency=2, module="tests.apps.typed_app") as worker:
        result = worker.send(typed_app.rename_book, {"title": "a", "pages": 3}, "b")
        assert result.get(timeout=WAIT) == {"title": "b", "changed": True}


def test_pydantic_model_returned_eagerly(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager ``apply()`` and a direct call dump the model as a sync task does."""
    task = type(typed_app.rename_book._get_current_object())
    monkeypatch.setattr(task, "async_session_url", database_url)
    book = {"title": "a", "pages": 3}
    assert typed_app.rename_book.apply((book, "a")).get() == {"title": "a", "changed": False}
    assert typed_app.rename_book(typed_app.Book(title="a", pages=1), "c") == {
        "title": "c",
        "changed": True,
    }
