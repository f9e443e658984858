"""Checked by ``mypy --strict`` and pyright strict (unused ignores reported): each wrong call
errs on its own line."""

from __future__ import annotations

from typing import assert_type

from celery import Celery

from async_session_task import AsyncSessionTask, task

# Eager, so that tests/test_typed.py also runs the correct calls.
EAGER = {"task_always_eager": True, "async_session_url": "sqlite+aiosqlite://"}
app = Celery("typing", set_as_current=False, config_source=EAGER)


@task(app, autocommit=True)
async def rename(book_id: int, title: str) -> str:
    return title


@task(app, bind=True)
async def retrying(self: AsyncSessionTask[[int], None], n: int) -> None:
    if n > 0:
        self.delay_on_commit(n - 1)  # published when this run's session commits
    await self.session.commit()


def correct_calls() -> None:
    typed: AsyncSessionTask[[int, str], str] = rename
    bound: AsyncSessionTask[[int], None] = retrying
    assert_type(typed(1, "x"), str)
    bound.delay(1)
    assert_type(rename(1, "x"), str)
    rename.delay(1, "x")
    rename.delay(book_id=1, title="x")
    rename.apply_async((1, "x"), countdown=5)
    rename.si(1, "x")
    rename.s(1)  # a partial: the title may come from a chain
    assert_type(retrying(1), None)


def wrong_calls() -> None:
    rename.delay("1", "x")  # type: ignore[arg-type]
    rename.delay(1)  # type: ignore[call-arg]
    rename.delay(1, "x", 3)  # type: ignore[call-arg]
    rename.delay_on_commit(1, 2)  # type: ignore[arg-type]
    rename.si("1", "x")  # type: ignore[arg-type]
    retrying(1, 2)  # type: ignore[call-arg]
    retrying.delay("1")  # type: ignore[arg-type]


async def correct_async_calls() -> None:
    await rename.adelay(1, "x")
    await rename.adelay(book_id=1, title="x")
    await rename.aapply_async((1, "x"), publish_timeout=2.0, countdown=5)


async def wrong_async_calls() -> None:
    await rename.adelay("1", "x")  # type: ignore[arg-type]
    await rename.adelay(1)  # type: ignore[call-arg]
