"""Settings: what a task's settings are, read and checked, and the errors that say what is
wrong.

A leaf module (it imports nothing of this package): pure functions from a task and its app's
``app.conf`` to what a run needs; ``_factory`` turns settings into sessions. Every setting
and its default is here, in code (docs/configuration.md lists them). No message made here
shows a database password.
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import ImproperlyConfigured
from celery.utils.imports import symbol_by_name
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

#: The settings that say where a task's sessions come from, with their defaults.
DEFAULTS: Mapping[str, Any] = {
    "async_session_url": None,
    "async_session_engine_options": {},
    "async_session_options": {},
    "async_session_maker": None,
}
#: The two settings of which a task or the app sets exactly one.
SOURCES = ("async_session_url", "async_session_maker")

#: Options given to every ``async_sessionmaker`` built from ``async_session_url``.
#: ``expire_on_commit=False``: after ``commit()`` the body can still read attributes
#: without another round trip (an expired attribute would need an implicit, awaited load).
SESSION_DEFAULTS: Mapping[str, Any] = {"expire_on_commit": False}

#: Seconds the loop may stay unresponsive before the watchdog warns (``app.conf`` only).
STALL_THRESHOLD = "async_session_stall_threshold"
DEFAULT_STALL_THRESHOLD = 1.0

#: Options given to every engine built from ``async_session_url``, under the user's
#: ``async_session_engine_options``. ``pool_pre_ping=True``: a pooled connection is tested
#: before a run gets it, so a database restart or failover costs no run that starts after
#: it (docs/internals.md#dead-pooled-connections).
ENGINE_DEFAULTS: Mapping[str, Any] = {"pool_pre_ping": True}

#: A ``QueuePool`` whose size the options do not give: at most as many connections as
#: SQLAlchemy's 5 + 10 overflow, all kept once opened (an overflow connection is closed as
#: it is returned: docs/performance.md#the-candidates).
POOL_DEFAULTS: Mapping[str, Any] = {"pool_size": 15, "max_overflow": 0}


def pool_defaults(url: str, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """:data:`POOL_DEFAULTS` where they apply: a ``QueuePool`` (not SQLite's pools, not a
    ``poolclass`` or ``pool`` of the user's) whose size the options do not give."""
    sized = {"pool_size", "max_overflow", "poolclass", "pool"} & set(options)
    return {} if sized or url.startswith("sqlite") else POOL_DEFAULTS


#: Seconds a message sent from outside a task body may wait to be handed to the broker
#: (``apublish``, ``adelay``, ``on_commit`` in a web app); app.conf.
PUBLISH_TIMEOUT = "async_session_publish_timeout"
DEFAULT_PUBLISH_TIMEOUT = 10.0

#: ``on_commit`` calls write their message to the outbox unless they say ``durable=False``.
OUTBOX = "async_session_outbox"
#: Each worker runs the outbox relay in a thread of its main process (app.conf).
OUTBOX_RELAY = "async_session_outbox_relay"
#: Seconds the relay leaves a new outbox row to the fast path (app.conf; the relay's default).
OUTBOX_GRACE = "async_session_outbox_grace"

#: Idempotent runs' markers older than this are deleted by ``check --cleanup`` (app.conf).
RUNS_RETENTION = "async_session_runs_retention"
DEFAULT_RUNS_RETENTION = datetime.timedelta(days=7)

#: A callable taking the Celery app and returning an async context manager, entered once per
#: process on its loop (a task's class attribute or option, else ``app.conf``).
LIFESPAN = "async_session_lifespan"

EXAMPLE_URL = "'postgresql+asyncpg://user:password@host/dbname' or 'sqlite+aiosqlite:///path.db'"

#: Equal for settings that share one engine: the URL (password included) and the options.
EngineKey = tuple[str, str]


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
        """Read the settings of ``task`` (a class attribute or ``@app.task`` option of the
        task, else ``app.conf``).

        Where sessions come from is chosen as one unit: if the task sets
        ``async_session_url`` or ``async_session_maker``, its own pair and its own options
        are used and the app's are not read (a task for a second database); otherwise the
        app's pair, with each option read from the task first, then from ``app.conf``.
        """
        own = {name: getattr(task, name, None) for name in DEFAULTS}
        chooses_source = any(own[name] is not None for name in SOURCES)
        conf = task.app.conf

        def read(name: str) -> Any:
            value = own[name]
            if value is None and not chooses_source:
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

    def engine_key(self) -> EngineKey:
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
                f"{task}: async_session_url must be a string such as {EXAMPLE_URL}, "
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


def task_time_limits(task: Any) -> tuple[float | None, float | None]:
    """The (soft, hard) time limits of ``task`` in seconds: its own, else ``app.conf``'s."""
    conf = task.app.conf
    return (
        task.soft_time_limit or conf.task_soft_time_limit,
        task.time_limit or conf.task_time_limit,
    )


def time_limits(task: Any, request: Any) -> tuple[float | None, float | None]:
    """The (soft, hard) time limits of this run in seconds, resolved as Celery does: the
    message's own (``apply_async(soft_time_limit=...)``), then :func:`task_time_limits`.

    Eager and direct calls run without limits, as Celery runs them.
    """
    if request.is_eager or request.called_directly:
        return None, None
    hard, soft = request.timelimit or (None, None)
    task_soft, task_hard = task_time_limits(task)
    return soft or task_soft, hard or task_hard


def publish_timeout(conf: Any) -> float:
    """``async_session_publish_timeout`` in seconds."""
    configured = conf.get(PUBLISH_TIMEOUT)
    return DEFAULT_PUBLISH_TIMEOUT if configured is None else float(configured)


def runs_retention(conf: Any) -> datetime.timedelta:
    """``async_session_runs_retention`` as a ``timedelta`` (a number is seconds)."""
    value = conf.get(RUNS_RETENTION) or DEFAULT_RUNS_RETENTION
    return value if isinstance(value, datetime.timedelta) else datetime.timedelta(seconds=value)


def stall_threshold(conf: Any) -> float:
    """``async_session_stall_threshold`` in seconds (0: the watchdog is off)."""
    configured = conf.get(STALL_THRESHOLD)
    return DEFAULT_STALL_THRESHOLD if configured is None else float(configured)


def lifespan_of(task: Any) -> Callable[[Any], Any] | None:
    """The ``async_session_lifespan`` of ``task`` (its own, else ``app.conf``'s), imported if
    it is a string; None when none is set.

    Raises:
        ImproperlyConfigured: the import string does not resolve, or the value is not
            callable.
    """
    configured = getattr(task, LIFESPAN, None)
    if configured is None:
        configured = task.app.conf.get(LIFESPAN)
    if configured is None:
        return None
    lifespan = imported(LIFESPAN, configured, f"task {task.name!r}")
    if not callable(lifespan):
        raise ImproperlyConfigured(
            f"{LIFESPAN} of task {task.name!r} must be a callable that takes the Celery app "
            f"and returns an async context manager, got {type(lifespan).__name__}."
        )
    resolved: Callable[[Any], Any] = lifespan
    return resolved


def _shown(url: str | URL | None) -> str | None:
    if url is None:
        return None
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<not a URL>"


def imported(setting: str, value: Any, owner: str) -> Any:
    """``value``, or the object it names if it is an import string ``"pkg.module:name"``.

    Raises:
        ImproperlyConfigured: the import string does not resolve.
    """
    if not isinstance(value, str):
        return value
    try:
        return symbol_by_name(value)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"{setting} {value!r} of {owner} does not resolve "
            f"({type(exc).__name__}: {exc}). Use 'package.module:name'."
        ) from None
