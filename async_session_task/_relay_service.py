"""Relaying an app's outbox: one :class:`~._relay.Relay` per database its tasks use, run by
``celery -A proj async-session relay`` (``_cli``) or inside a worker (:class:`EmbeddedRelay`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from celery.exceptions import ImproperlyConfigured
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _config, _factory
from ._relay import Options, Relay
from ._task import async_session_tasks

logger = logging.getLogger("async_session_task")


def engines_of(app: Any) -> list[AsyncEngine]:
    """One engine per database the app's ``AsyncSessionTask`` tasks use, made here (on the
    caller's loop, as the check command makes them)."""
    engines: dict[_config.EngineKey, AsyncEngine] = {}
    found: dict[int, AsyncEngine] = {}
    for task in async_session_tasks(app):
        try:
            maker = _factory.session_factory(_config.Settings.of(task), engines)
        except ImproperlyConfigured as exc:
            logger.error("relay: task %s has no database: %s", task.name, exc)
            continue
        for engine in _factory.engines_of(maker):
            found.setdefault(id(engine), engine)
    return list(found.values())


async def relay_all(
    app: Any, options: Options | None = None, stop: asyncio.Event | None = None
) -> int:
    """Relay the outbox of every database of ``app`` until ``stop`` is set; without ``stop``,
    until no row is due (``--once``). Returns the messages published."""
    relays = [Relay(app, engine, options) for engine in engines_of(app)]
    try:
        if stop is not None:
            await asyncio.gather(*(relay.run(stop) for relay in relays))
            return 0

        async def drain(relay: Relay) -> int:
            published = 0
            while (outcome := await relay.run_once()).claimed and not outcome.broker_down:
                published += outcome.published
            return published + outcome.published

        return sum(await asyncio.gather(*(drain(relay) for relay in relays)))
    finally:
        for relay in relays:
            relay.close()
            await relay.engine.dispose()


class EmbeddedRelay(threading.Thread):
    """The relay inside a worker (``async_session_outbox_relay = True``), as Celery's
    ``celery.beat.EmbeddedService`` runs beat in one (``worker -B``): a thread of the worker's
    main process with a loop and engines of its own, stopped at worker shutdown."""

    def __init__(self, app: Any) -> None:
        super().__init__(name="async_session_task-relay", daemon=True)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop_event = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await relay_all(self.app, Options.of(self.app), stop=self._stop_event)

    def stop(self, timeout: float = 30.0) -> None:
        self._started.wait(timeout)
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(timeout)
