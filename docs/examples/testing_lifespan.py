"""A test that gives the runs a lifespan state of its own: an HTTP client whose transport
answers from the test (no network), and an in-memory cache instead of Redis."""

from __future__ import annotations

import asyncio

import httpx

from async_session_task.testing import override_lifespan_state
from examples import settings
from examples.lifespan import Base, record_page


class MemoryCache:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    async def get(self, key: str) -> int | None:
        return self.values.get(key)

    async def set(self, key: str, value: int, ex: int) -> None:
        self.values[key] = value


def test_record_page_caches_the_status() -> None:
    asyncio.run(settings.create_tables(Base.metadata))  # or: alembic upgrade head
    transport = httpx.MockTransport(lambda request: httpx.Response(404))
    cache = MemoryCache()
    state = {"http": httpx.AsyncClient(transport=transport, base_url="http://test"), "cache": cache}
    with override_lifespan_state(state):
        report = record_page.apply(args=("/missing",)).get()
    assert report["status"] == 404
    assert cache.values == {"examples-lifespan:/missing": 404}
