"""Settings: where a task's sessions come from, and the errors that say what is wrong.

Each setting is read from the task class first (a subclass for a second database sets
its own), then from ``app.conf``. The result is resolved once per task class and process,
at the task's first run; :func:`check_worker_tasks` checks every task at worker start too,
so a bad setting is in the log before the first message arrives, and
:func:`check_pool_capacity` warns when an engine's pool is smaller than the concurrency.

No message made here shows a database password: URLs are rendered with
``hide_password=True``, and errors that could echo the URL are not chained.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import signals
from celery.exceptions import ImproperlyConfigured
from celery.utils.imports import symbol_by_name
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

logger = logging.getLogger("async_session_task")

#: Every setting this library reads, with its default.
DEFAULTS: Mapping[str, Any] = {
    "async_session_url": None,
    "async_session_engine_options": {},
    "async_session_options": {},
    "async_session_maker": None,
}

#: Options given to every ``async_sessionmaker`` built from ``async_session_url``.
#: ``expire_on_commit=False``: after ``commit()`` the body can still read attributes
#: without another round trip (an expired attribute would need an implicit, awaited load).
SESSION_DEFAULTS: Mapping[str, Any] = {"expire_on_commit": False}

#: The asyncio driver to suggest for a URL whose driver is sync or not named.
ASYNC_DRIVERS: Mapping[str, str] = {
    "postgresql": "asyncpg",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
    "sqlite": "aiosqlite",
    "mssql": "aioodbc",
    "oracle": "oracledb",
}

_EXAMPLE_URL = "'postgresql+asyncpg://user:password@host/dbname' or 'sqlite+aiosqlite:///path.db'"


@dataclass(frozen=True)
class Settings:
    # repr=False: the URL may hold a password; __repr__ below hides it.
    url: str | URL | None = field(repr=False)
    engine_options: Mapping[str, Any]
    session_options: Mapping[str, Any]
    maker: async_sessionmaker[Any] | str | None
    task_name: str = ""

    @classmethod
    def of(cls, task: Any) -> Settings:
        """Read the settings of ``task``: its class attributes first, then ``app.conf``."""
        conf = task.app.conf

        def read(name: str) -> Any:
            value = getattr(task, name, None)
            if value is None:
                value = conf.get(name)
            return DEFAULTS[name] if value is None else value

        return cls(
            url=read("async_session_url"),
            engine_options=read("async_session_engine_options"),
            session_options=read("async_session_options"),
            maker=read("async_session_maker"),
            task_name=task.name,
        )

    def __repr__(self) -> str:
        return (
            f"Settings(task_name={self.task_name!r}, url={_shown(self.url)!r}, "
            f"engine_options={self.engine_options!r}, session_options={self.session_options!r}, "
            f"maker={self.maker!r})"
        )

    def engine_key(self) -> tuple[str, str]:
        """Tasks with equal URL and options share one engine, so one connection pool."""
        assert self.url is not None
        url = (
            self.url.render_as_string(hide_password=False)
            if isinstance(self.url, URL)
            else self.url
        )
        return url, repr(sorted(self.engine_options.items()))

    def check(self, task_name: str | None = None) -> None:
        """Raise :class:`ImproperlyConfigured` unless the settings can make sessions.

        Checks what needs no import and no engine: exactly one session source, option
        types and keywords of ``async_sessionmaker``. :func:`create_engine` and
        :func:`resolve_maker` check the rest.
        """
        task = f"Task {task_name or self.task_name!r}"
        if self.url is None and self.maker is None:
            raise ImproperlyConfigured(
                f"{task} has no database: set app.conf.async_session_url "
                "(e.g. 'postgresql+asyncpg://user@host/db') or app.conf.async_session_maker "
                "(your async_sessionmaker, or an import string 'pkg.module:SessionLocal')."
            )
        if self.url is not None and self.maker is not None:
            raise ImproperlyConfigured(
                f"{task} has both async_session_url and async_session_maker set: "
                "keep one. With async_session_maker, engine and session options belong to "
                "your own async_sessionmaker."
            )
        for name, value in (
            ("async_session_engine_options", self.engine_options),
            ("async_session_options", self.session_options),
        ):
            if not isinstance(value, Mapping):
                raise ImproperlyConfigured(
                    f"{task}: {name} must be a dict of keyword arguments, "
                    f"got {type(value).__name__}."
                )
        if self.maker is not None and (self.engine_options or self.session_options):
            raise ImproperlyConfigured(
                f"{task}: async_session_engine_options and async_session_options "
                "apply only to async_session_url; configure your async_sessionmaker instead."
            )
        if self.url is not None and not isinstance(self.url, str | URL):
            raise ImproperlyConfigured(
                f"{task}: async_session_url must be a string such as {_EXAMPLE_URL}, "
                f"got {type(self.url).__name__}."
            )
        unknown = _unknown_session_options(self.session_options)
        if unknown:
            raise ImproperlyConfigured(
                f"{task}: async_session_options has {', '.join(map(repr, unknown))}, "
                "not a keyword of async_sessionmaker or AsyncSession"
                + (
                    " (the bind is the engine of async_session_url; for your own binds "
                    "set async_session_maker)."
                    if "bind" in unknown
                    else "."
                )
            )


def _unknown_session_options(options: Mapping[str, Any]) -> list[str]:
    """Keywords that neither ``async_sessionmaker``, its ``class_`` nor its sync
    ``Session`` accept: ``async_sessionmaker`` would only fail at the first session."""
    if "bind" in options:
        return ["bind"]
    class_ = options.get("class_", AsyncSession)
    sync_class = (
        options.get("sync_session_class") or getattr(class_, "sync_session_class", None) or Session
    )
    known: set[str] = set()
    for function in (async_sessionmaker.__init__, class_.__init__, sync_class.__init__):
        parameters = inspect.signature(function).parameters.values()
        known |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if function is sync_class.__init__ and any(p.kind is p.VAR_KEYWORD for p in parameters):
            return []  # a custom Session that takes any keyword: it decides
    return sorted(set(options) - known - {"self", "bind"})


def resolve_maker(settings: Settings, task_name: str | None = None) -> async_sessionmaker[Any]:
    """Import (if it is a string) and type-check a configured ``async_sessionmaker``."""
    task = f"task {task_name or settings.task_name!r}"
    maker = settings.maker
    if isinstance(maker, str):
        try:
            maker = symbol_by_name(maker)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"async_session_maker {settings.maker!r} of {task} does not resolve "
                f"({type(exc).__name__}: {exc}). Use 'package.module:name'."
            ) from None
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
            f"{task}: async_session_url is not a database URL; expected e.g. {_EXAMPLE_URL}. "
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
    try:
        return _create_async_engine(url, **settings.engine_options)
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


def validate(task: Any) -> None:
    """Check everything a first run of ``task`` would need, without connecting.

    Raises:
        ImproperlyConfigured: with the message the first run would fail with.
    """
    settings = Settings.of(task)
    settings.check(task.name)
    if settings.maker is not None:
        resolve_maker(settings, task.name)
    else:
        create_engine(settings).sync_engine.dispose(close=False)


def check_worker_tasks(sender: Any = None, **_: Any) -> None:
    """``worker_init``: log every misconfigured ``AsyncSessionTask`` of the worker's app.

    The worker still starts (it may serve other tasks); such a task fails each run with
    the same :class:`ImproperlyConfigured` message.
    """
    from ._task import AsyncSessionTask  # _task imports this module

    app = getattr(sender, "app", None)
    if app is None:
        return
    for name, task in sorted(app.tasks.items()):
        if isinstance(task, AsyncSessionTask):
            try:
                validate(task)
            except ImproperlyConfigured as exc:
                logger.error("Task %s will fail every run: %s", name, exc)


def engines_of(maker: async_sessionmaker[Any]) -> list[AsyncEngine]:
    """The async engines a maker binds its sessions to."""
    bind = maker.kw.get("bind")
    binds = maker.kw.get("binds") or {}
    return [e for e in (bind, *binds.values()) if isinstance(e, AsyncEngine)]


def check_pool_capacity(sender: Any = None, **_: Any) -> None:
    """``worker_init``: warn once when one process runs more tasks at once than its engine
    can give connections to (threads, gevent, eventlet; prefork and solo run one at a time)."""
    from ._task import AsyncSessionTask  # _task imports this module

    pool_module = getattr(getattr(sender, "pool_cls", None), "__module__", "") or ""
    concurrency = getattr(sender, "concurrency", None)
    if not concurrency or pool_module.endswith(("prefork", "solo")):
        return
    warned: set[tuple[Any, ...]] = set()
    for task in sender.app.tasks.values():
        if not isinstance(task, AsyncSessionTask):
            continue
        try:
            settings = Settings.of(task)
            capacity, where = _capacity(settings)
        except Exception:  # misconfiguration is reported by check_worker_tasks
            continue
        if capacity is None or capacity >= concurrency or where in warned:
            continue
        warned.add(where)
        logger.warning(
            "The connection pool holds at most %d connections, but this worker runs up to "
            "%d tasks at once in one process: runs will wait for a connection (and fail "
            "after pool_timeout). Raise pool_size/max_overflow in %s to %d or more.",
            capacity,
            concurrency,
            "async_session_engine_options" if settings.maker is None else "your engine",
            concurrency,
        )


def _capacity(settings: Settings) -> tuple[int | None, tuple[Any, ...]]:
    """Most connections the settings' engine pool hands out (None: unbounded or unknown)."""
    if settings.maker is None:
        options = settings.engine_options
        if "poolclass" in options or str(settings.url or "").startswith("sqlite"):
            return None, ()
        # QueuePool's defaults; a negative max_overflow means no limit.
        size, overflow = options.get("pool_size", 5), options.get("max_overflow", 10)
        key: tuple[Any, ...] = settings.engine_key()
    else:
        maker = resolve_maker(settings)
        engines = engines_of(maker)
        if len(engines) != 1 or not isinstance(engines[0].pool, QueuePool):
            return None, ()
        pool = engines[0].pool
        # QueuePool keeps its overflow limit private; size() is public.
        size, overflow = pool.size(), getattr(pool, "_max_overflow", -1)
        key = (id(engines[0]),)
    if overflow < 0:
        return None, ()
    return int(size) + int(overflow), key


def _shown(url: str | URL | None) -> str | None:
    if url is None:
        return None
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<not a URL>"


# worker_init fires once, in the worker's main process, for every pool, after the task
# modules were imported (celery/worker/worker.py); prefork children inherit the result.
signals.worker_init.connect(check_worker_tasks, weak=False)
signals.worker_init.connect(check_pool_capacity, weak=False)
