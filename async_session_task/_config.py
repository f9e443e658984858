"""Settings: where a task's sessions come from.

Each setting is read from the task class first (a subclass for a second database sets
its own), then from ``app.conf``. The result is resolved once per task class and process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery.exceptions import ImproperlyConfigured
from celery.utils.imports import symbol_by_name
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

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


@dataclass(frozen=True)
class Settings:
    url: str | None
    engine_options: Mapping[str, Any]
    session_options: Mapping[str, Any]
    maker: async_sessionmaker[Any] | str | None

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
        )

    def engine_key(self) -> tuple[str, str]:
        """Tasks with equal URL and options share one engine, so one connection pool."""
        assert self.url is not None
        return self.url, repr(sorted(self.engine_options.items()))

    def check(self, task_name: str) -> None:
        """Raise :class:`ImproperlyConfigured` unless exactly one session source is set."""
        if self.url is None and self.maker is None:
            raise ImproperlyConfigured(
                f"Task {task_name!r} has no database: set app.conf.async_session_url "
                "(e.g. 'postgresql+asyncpg://user@host/db') or app.conf.async_session_maker "
                "(your async_sessionmaker, or an import string 'pkg.module:SessionLocal')."
            )
        if self.url is not None and self.maker is not None:
            raise ImproperlyConfigured(
                f"Task {task_name!r} has both async_session_url and async_session_maker set: "
                "keep one. With async_session_maker, engine and session options belong to "
                "your own async_sessionmaker."
            )
        if self.maker is not None and (self.engine_options or self.session_options):
            raise ImproperlyConfigured(
                f"Task {task_name!r}: async_session_engine_options and async_session_options "
                "apply only to async_session_url; configure your async_sessionmaker instead."
            )
        for name, value in (
            ("async_session_engine_options", self.engine_options),
            ("async_session_options", self.session_options),
        ):
            if not isinstance(value, Mapping):
                raise ImproperlyConfigured(
                    f"{name} must be a dict of keyword arguments, got {type(value).__name__}."
                )


def resolve_maker(settings: Settings, task_name: str) -> async_sessionmaker[Any]:
    """Import (if it is a string) and type-check a configured ``async_sessionmaker``."""
    maker = settings.maker
    if isinstance(maker, str):
        try:
            maker = symbol_by_name(maker)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"async_session_maker {settings.maker!r} of task {task_name!r} does not "
                f"resolve: {exc}. Use 'package.module:name'."
            ) from exc
    if not isinstance(maker, async_sessionmaker):
        raise ImproperlyConfigured(
            f"async_session_maker of task {task_name!r} must be a "
            f"sqlalchemy.ext.asyncio.async_sessionmaker, got {type(maker).__name__}."
        )
    return maker


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the engine for ``async_session_url``; errors never show the password."""
    assert settings.url is not None
    try:
        url = make_url(settings.url)
    except ArgumentError as exc:
        raise ImproperlyConfigured(
            "async_session_url is not a database URL; expected e.g. "
            "'postgresql+asyncpg://user:password@host/dbname' or "
            "'sqlite+aiosqlite:///path.db'."
        ) from exc
    shown = url.render_as_string(hide_password=True)
    try:
        engine = create_async_engine(url, **settings.engine_options)
    except TypeError as exc:
        raise ImproperlyConfigured(
            f"async_session_engine_options are not valid for {shown}: {exc}"
        ) from exc
    except Exception as exc:
        # InvalidRequestError for a sync driver, NoSuchModuleError for an unknown one.
        raise ImproperlyConfigured(
            f"Cannot create an async engine for {shown}: {exc}. Use an asyncio driver, "
            "e.g. 'postgresql+asyncpg://' or 'sqlite+aiosqlite://'."
        ) from None
    return engine
