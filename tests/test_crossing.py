"""The greenlet driver of bodies: pooled greenlets keep nothing of the runs they served."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest

from async_session_task import _drive


class Payload:
    """Something a body holds, returns or raises with; a weak reference tells if it lives."""


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_an_idle_body_greenlet_keeps_no_outcome_alive(fails: bool) -> None:
    refs: list[weakref.ref[Payload]] = []

    async def body() -> Payload:
        payload = Payload()
        refs.append(weakref.ref(payload))
        await asyncio.sleep(0)
        if fails:
            raise ValueError(payload)
        return payload

    async def main() -> None:
        with contextlib.suppress(ValueError):
            await _drive.drive(body())

    asyncio.run(main())
    gc.collect()
    assert len(refs) == 1
    assert refs[0]() is None
