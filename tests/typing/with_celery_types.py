"""Checked only with celery-types installed, where ``AsyncResult`` is generic: the result of
sending a typed task carries the body's return type."""

from __future__ import annotations

from typing import assert_type

from celery.result import AsyncResult

from .calls import rename, retrying


def results_carry_the_return_type() -> None:
    assert_type(rename.delay(1, "x"), AsyncResult[str])
    assert_type(rename.apply_async((1, "x")), AsyncResult[str])
    assert_type(retrying.delay(1), AsyncResult[None])


async def async_results_carry_the_return_type() -> None:
    assert_type(await rename.adelay(1, "x"), AsyncResult[str])
    assert_type(await rename.aapply_async((1, "x"), publish_timeout=2.0), AsyncResult[str])


def wrong_result_type() -> AsyncResult[int]:
    return rename.delay(1, "x")  # type: ignore[return-value]
