"""Typed tasks at runtime: ``pydantic=True`` returns a dumped model on every pool and eagerly."""

from __future__ import annotations

import pytest

from async_session_task import AsyncSessionTask
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


@pytest.mark.services
@pytest.mark.timeout(180)
def test_task_decorator_registers_and_runs(start_worker: StartWorker) -> None:
    """``task(app, ...)`` registers an ``AsyncSessionTask`` with the options it was given."""
    for registered in (typed_app.count_to, typed_app.own_name):
        assert isinstance(registered._get_current_object(), AsyncSessionTask)
    assert typed_app.count_to.autocommit is True
    assert typed_app.count_to.name in typed_app.app.tasks
    with start_worker(pool="threads", concurrency=2, module="tests.apps.typed_app") as worker:
        assert worker.send(typed_app.count_to, 3, "n").get(timeout=WAIT) == "n:3"
        assert worker.send(typed_app.own_name, 4).get(timeout=WAIT) == (
            f"{typed_app.own_name.name}:4"
        )


def test_generic_task_class_at_runtime() -> None:
    """``AsyncSessionTask[[int], None]`` is valid at runtime, and Celery's ``type()`` works."""
    alias = AsyncSessionTask[[int], None]
    assert getattr(alias, "__origin__", None) is AsyncSessionTask
    built = type("built", (AsyncSessionTask,), {"run": _body, "__module__": __name__})
    assert issubclass(built, AsyncSessionTask)


async def _body(n: int) -> int:
    return n


def test_typed_calls_run_eagerly() -> None:
    """The calls mypy checks in tests/typing/calls.py also run (eagerly)."""
    from tests.typing import calls

    calls.correct_calls()
    assert calls.rename.delay(2, "y").get() == "y"
