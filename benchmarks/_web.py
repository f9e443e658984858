"""The web app ``benchmarks.calling --served`` runs under uvicorn: each request sends
``bench.calling`` and waits for its result, cooperatively (``/async``: ``adelay`` + ``aget``)
or as plain Celery code in the handler (``/sync``: ``delay()`` + ``get()``, on the loop), or
not at all (``/none``: what uvicorn and FastAPI alone cost); a
ticker on the same loop keeps its longest stall, read and reset by ``POST /stall``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from async_session_task import aget
from benchmarks.calling import target

longest = 0.0


async def tick() -> None:
    global longest
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    ticker = asyncio.create_task(tick())
    yield
    ticker.cancel()


api = FastAPI(lifespan=lifespan)


@api.get("/async/{n}")
async def cooperative(n: int) -> int:
    value: int = await aget(await target.adelay(n), timeout=60)
    return value


@api.get("/sync/{n}")
async def blocking(n: int) -> int:
    value: int = target.delay(n).get(timeout=60)  # what the library replaces: blocks the loop
    return value


@api.get("/none/{n}")
async def nothing(n: int) -> int:
    """What the server alone costs: sends nothing."""
    return n


@api.post("/stall")
async def stall() -> float:
    """The longest stall since the last call, in ms."""
    global longest
    found, longest = longest, 0.0
    return found * 1e3
