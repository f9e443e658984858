"""``apublish`` while the broker is stopped, then once it is back: a private Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from celery import Celery

from async_session_task import PublishTimeout, apublish
from tests.faults.services import PrivateRedis

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


def test_sending_fails_fast_while_the_broker_is_down_and_works_once_it_is_back(
    private_redis: PrivateRedis,
) -> None:
    app = Celery("calling-fault", broker=private_redis.url, set_as_current=False)
    app.conf.broker_connection_timeout = 1
    signature = app.signature("calling.fault", queue="calling-fault")

    async def send(bound: float) -> tuple[str, float]:
        started = time.monotonic()
        try:
            result = await apublish(signature, publish_timeout=bound)
        except PublishTimeout:
            return "timeout", time.monotonic() - started
        return str(result.id), time.monotonic() - started

    assert asyncio.run(send(5.0))[0] != "timeout"
    private_redis.stop()
    try:
        outcome, elapsed = asyncio.run(send(1.0))
        assert outcome == "timeout"
        assert elapsed < 1.5, elapsed
    finally:
        private_redis.start()
    deadline = time.monotonic() + 30
    while (outcome := asyncio.run(send(2.0))[0]) == "timeout":  # the pool's dead connection
        assert time.monotonic() < deadline, "sending never worked again"
    assert outcome != "timeout"
    app.close()
