"""Session factories: from settings to the engine and the ``async_sessionmaker`` a task's
settings describe, and :data:`factories`, the ones this process made (per task class).

:func:`session_factory` is the only way from settings to a session factory: a task's first
run in a process, the worker-start check and ``celery async-session check`` all use it, so
they cannot disagree. No message made here shows a database password: URLs are rendered
with ``hide_password=True``, and errors that could echo the URL are not chained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from celery.exceptions import ImproperlyConfigured
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.pool import QueuePool

from . import _ping
from ._config import (
    ENGINE_DEFAULTS,
    EXAMPLE_URL,
    SESSION_DEFAULTS,
    EngineKey,
    Settings,
    imported,
    pool_defaults,
)
from .signals import engine_created

logger = logging.getLogger("async_session_task")

#: The asyncio driver to suggest for a URL whose driver is sync or not named.
ASYNC_DRIVERS: Mapping[str, str] = {
    "postgresql": "asyncpg",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
    "sqlite": "aiosqlite",
    "mssql": "aioodbc",
    "oracle": "oracledb",
}


def resolve_maker(settings: Settings, task_name: str | None = None) -> async_sessionmaker[Any]:
    """Import (if it is a string) and type-check a configured ``async_sessionmaker``."""
    task = f"task {task_name or settings.task_name!r}"
    maker = imported("async_session_maker", settings.maker, task)
    if not isinstance(maker, async_sessionmaker):
        hint = (
            " (a sync sessionmaker: use sqlalchemy.ext.asyncio.async_sessionmaker)"
            if type(maker).__name__ == "sessionmaker"
            else ""
        )
        raise ImproperlyConfigured(
            f"async_session_maker of {task} must be a "
            f"sqlalchemy.ext.asyncio.async_sessionmaker, got {type(maker).__name__}{hint}."
        )
    return maker


def parse_url(settings: Settings) -> URL:
    """The ``async_session_url`` as a URL with an asyncio driver, or ImproperlyConfigured."""
    task = f"Task {settings.task_name!r}"
    assert settings.url is not None
    try:
        url = make_url(settings.url)
    except Exception:
        # Not chained: some parse errors quote the URL, password included.
        raise ImproperlyConfigured(
            f"{task}: async_session_url is not a database URL; expected e.g. {EXAMPLE_URL}. "
            "Percent-encode special characters in the password."
        ) from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    driver = ASYNC_DRIVERS.get(backend)
    use = (
        f"'{backend}+{driver}://'" if driver else "an asyncio driver, e.g. 'postgresql+asyncpg://'"
    )
    if "+" not in url.drivername:
        # The default driver of a bare name is sync, or depends on the SQLAlchemy version
        # (postgresql: psycopg2 in 2.0, psycopg in 2.1): name it, so every version agrees.
        raise ImproperlyConfigured(
            f"{task}: async_session_url {shown} names no driver; use {use} "
            "(the rest of the URL unchanged)."
        )
    try:
        dialect = url.get_dialect(_is_async=True)
    except Exception as exc:
        raise ImproperlyConfigured(
            f"{task}: async_session_url {shown}: SQLAlchemy has no driver "
            f"{url.drivername!r} ({type(exc).__name__}); use {use}."
        ) from None
    if not getattr(dialect, "is_async", False):
        raise ImproperlyConfigured(
            f"{task}: async_session_url {shown} uses {url.get_driver_name()!r}, a sync "
            f"driver; use {use} (the rest of the URL unchanged)."
        )
    return url


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the engine for ``async_session_url``; errors never show the password."""
    url = parse_url(settings)
    shown = url.render_as_string(hide_password=True)
    given = settings.engine_options
    options = {**ENGINE_DEFAULTS, **pool_defaults(str(url), given), **given}
    # On asyncpg the library pings in one round trip where SQLAlchemy takes three (_ping).
    ping = bool(options.get("pool_pre_ping")) and _ping.replaces_pre_ping(url)
    if ping:
        options["pool_pre_ping"] = False
    try:
        engine = _create_async_engine(url, **options)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"Task {settings.task_name!r}: the driver of {shown} is not installed "
            f"({exc}); install it, e.g. 'pip install {url.get_driver_name()}'."
        ) from None
    except Exception as exc:
        # TypeError for an unknown keyword or a value of the wrong type.
        raise ImproperlyConfigured(
            f"Task {settings.task_name!r}: async_session_engine_options "
            f"{sorted(settings.engine_options)} are not valid for {shown} "
            f"({type(exc).__name__}: {exc})."
        ) from None
    if ping:
        _ping.install(engine)
    return engine


def session_factory(
    settings: Settings, engines: MutableMapping[EngineKey, AsyncEngine]
) -> async_sessionmaker[Any]:
    """The session factory ``settings`` describe: the only way from settings to sessions.

    Used by a task's first run in a process and by the worker-start check alike, so both
    fail with the same message. Engines built from ``async_session_url`` are taken from, or
    added to, ``engines``: tasks with the same URL and options share one engine. Creating
    an engine does not connect.

    Raises:
        ImproperlyConfigured: the settings cannot make sessions; the message says why.
    """
    settings.check()
    if settings.maker is not None:
        return resolve_maker(settings)
    key = settings.engine_key()
    engine = engines.get(key)
    if engine is None:
        engine = engines[key] = create_engine(settings)
    return async_sessionmaker(engine, **{**SESSION_DEFAULTS, **settings.session_options})


def engines_of(maker: async_sessionmaker[Any]) -> list[AsyncEngine]:
    """The async engines a maker binds its sessions to."""
    bind = maker.kw.get("bind")
    binds = maker.kw.get("binds") or {}
    return [e for e in (bind, *binds.values()) if isinstance(e, AsyncEngine)]


def pool_capacity(settings: Settings) -> tuple[int | None, tuple[Any, ...]]:
    """Most connections the settings' engine pool hands out (None: unbounded or unknown),
    and a key that is equal for tasks sharing that pool."""
    if settings.maker is None:
        url = str(settings.url or "")
        options = {**pool_defaults(url, settings.engine_options), **settings.engine_options}
        if "poolclass" in options or url.startswith("sqlite"):
            return None, ()
        # QueuePool's defaults; a negative max_overflow means no limit.
        size, overflow = options.get("pool_size", 5), options.get("max_overflow", 10)
        if overflow < 0:
            return None, ()
        return int(size) + int(overflow), settings.engine_key()
    engines = engines_of(resolve_maker(settings))
    limit = pool_limit(engines[0].pool) if len(engines) == 1 else None
    return (None, ()) if limit is None else (limit, (id(engines[0]),))


def pool_limit(pool: Any) -> int | None:
    """Most connections ``pool`` hands out at once (None: unbounded, or not a QueuePool)."""
    if not isinstance(pool, QueuePool):
        return None
    # QueuePool keeps its overflow limit private; size() is public.
    overflow = getattr(pool, "_max_overflow", -1)
    return None if overflow < 0 else int(pool.size()) + int(overflow)


class Factories:
    """The session factory of each task class and the engines behind them, per process.

    Built by :func:`.session_factory` at a task's first run in the process; engines
    are disposed on the loop (:meth:`dispose`) when the loop stops, and forgotten in a
    forked child, which starts on fresh pools (docs/internals.md#fork).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._makers: dict[type[Any], async_sessionmaker[Any]] = {}
        self._engines: dict[EngineKey, AsyncEngine] = {}
        self._foreign: list[AsyncEngine] = []
        os.register_at_fork(after_in_child=self.forget)

    def maker_for(self, task: Any) -> async_sessionmaker[Any]:
        """The session factory of ``task``'s class, resolved once per process.

        Raises:
            celery.exceptions.ImproperlyConfigured: the task's settings cannot make sessions.
        """
        maker = self._makers.get(type(task))
        if maker is None:
            with self._lock:
                maker = self._makers.get(type(task))
                if maker is None:
                    settings = Settings.of(task)
                    known = list(self._engines.values())
                    maker = session_factory(settings, self._engines)
                    self._adopt(maker)
                    for engine in self._engines.values():
                        if not any(engine is e for e in known):
                            # Before any session uses it: instrumentation sees every statement.
                            engine_created.send(sender=task, engine=engine)
                    self._makers[type(task)] = maker
        return maker

    def _adopt(self, maker: async_sessionmaker[Any]) -> None:
        for engine in engines_of(maker):
            if engine in self._engines.values() or any(engine is e for e in self._foreign):
                continue
            # The app's own engine may have connected before this process existed (a prefork
            # parent) or on another loop: start this process on a new pool without touching
            # the old connections (docs/internals.md#fork).
            engine.sync_engine.dispose(close=False)
            self._foreign.append(engine)

    @contextlib.contextmanager
    def override(self, makers: Mapping[type[Any], async_sessionmaker[Any]]) -> Iterator[None]:
        """Within the block, runs of these task classes take their sessions from ``makers``
        (what :func:`async_session_task.testing.rollback_sessions` is built on)."""
        saved = {cls: self._makers.get(cls) for cls in makers}
        self._makers.update(makers)
        try:
            yield
        finally:
            for cls, maker in saved.items():
                if maker is None:
                    self._makers.pop(cls, None)
                else:
                    self._makers[cls] = maker

    def engine_count(self) -> int:
        return len(self._engines) + len(self._foreign)

    async def dispose(self) -> None:
        """On the loop the engines were used on: close their connections, then forget them
        (asyncpg connections left to a closed loop never close,
        docs/internals.md#dispose-on-loop)."""
        engines = [*self._engines.values(), *self._foreign]
        self.forget()
        for engine in engines:
            try:
                await engine.dispose()
            except Exception:
                logger.exception("Disposing %r failed", engine)

    def forget(self) -> None:
        """Drop every factory and engine without closing connections (a forked child, a
        lost loop): the next run in this process builds them anew."""
        self._lock = threading.Lock()
        self._makers, self._engines, self._foreign = {}, {}, []


factories = Factories()

#: Option engines: one per engine and isolation level (:func:`at_isolation_level`).
_at_level: dict[tuple[int, str], Engine] = {}


def at_isolation_level(
    engine: Engine, level: str, made: Callable[[Engine], None] | None = None
) -> Engine:
    """``engine.execution_options(isolation_level=level)``, made once per engine and level
    (an option engine shares its engine's pool; making one per use would cost a copy of its
    options each time). Each keeps its engine alive, so an id is not reused while its entry
    exists. ``made`` is called once with a new one (to add listeners to it alone)."""
    key = (id(engine), level)
    found = _at_level.get(key)
    if found is None:
        found = engine.execution_options(isolation_level=level)
        if made is not None:
            made(found)
        found = _at_level.setdefault(key, found)
    return found
