"""Durable publish: a message queued with ``on_commit(..., durable=True)`` is also written to
``async_session_outbox`` (``_tables``), in the caller's transaction, so it outlives a broker
outage or the death of the process between COMMIT and publish (docs/outbox.md).

A durable call adds its row to the session at call time, as ``session.add()`` adds any row:
the next flush writes it, a rollback or a rolled-back SAVEPOINT drops it, and the commit
commits it with the data. After the outermost COMMIT the message is published as any
``on_commit`` call (the fast path); the rows of the messages published are then deleted in
one short transaction of their own. What the fast path did not publish, the relay
(``_relay``) delivers.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.canvas import Signature
from kombu.serialization import dumps, loads
from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session, registry

from ._factory import at_isolation_level
from ._tables import outbox, table_problem

propagate: Any
try:  # optional: a relayed message keeps its caller's trace as parent
    propagate = importlib.import_module("opentelemetry.propagate")
except ImportError:  # OpenTelemetry is not a dependency
    propagate = None
#: kombu is untyped: its serializer functions, as what they are to this module.
_dumps: Callable[..., tuple[str, str, str | bytes]] = dumps
_loads: Callable[..., Any] = loads

logger = logging.getLogger("async_session_task")

#: Seconds the fast path leaves durable messages to the relay once a publish failed: a
#: refusing broker costs each publish seconds of connection attempts (2 s with Redis on a
#: refused port, even without retries), which the caller's commit would wait for.
PAUSE = 5.0
_paused_until = 0.0

_counts = {"deleted": 0, "delete_failures": 0, "left_to_relay": 0}
_counts_lock = threading.Lock()


class Message:
    """A row of the outbox, as the session adds it (mapped to the package's copy of the
    table, in a registry of its own: the user's models are not touched)."""

    id: str
    task_name: str
    content_type: str
    content_encoding: str
    body: bytes

    def __init__(self, **columns: Any) -> None:
        self.__dict__.update(columns)


registry().map_imperatively(Message, outbox)


def stage(session: Session, signature: Signature, task_id: str) -> None:
    """Add the row of ``signature`` (frozen, with ``task_id``) to ``session``.

    Raises:
        kombu.exceptions.EncodeError: the signature cannot be serialized with the app's
            ``task_serializer``: at the call, not later in the relay.
    """
    content_type, content_encoding, body = _dumps(
        envelope(signature), serializer=signature.app.conf.task_serializer
    )
    session.add(
        Message(
            id=task_id,
            task_name=signature.get("task") or type(signature).__name__,
            content_type=content_type,
            content_encoding=content_encoding,
            body=body.encode(content_encoding) if isinstance(body, str) else body,
        )
    )


def envelope(signature: Signature) -> dict[str, Any]:
    """What is stored of ``signature``: the signature as Celery serializes one (a dict, with
    its canvas), its relative times made absolute (a ``countdown`` is an ``eta``; a relative
    ``expires`` an absolute one), and the caller's trace context."""
    message = dict(signature)
    options = dict(message.get("options") or {})
    now = datetime.datetime.now(datetime.UTC)
    countdown = options.pop("countdown", None)
    if countdown is not None and options.get("eta") is None:
        options["eta"] = (now + datetime.timedelta(seconds=countdown)).isoformat()
    elif isinstance(options.get("eta"), datetime.datetime):
        options["eta"] = options["eta"].isoformat()
    expires = options.get("expires")
    if isinstance(expires, int | float):
        options["expires"] = (now + datetime.timedelta(seconds=expires)).isoformat()
    elif isinstance(expires, datetime.datetime):
        options["expires"] = expires.isoformat()
    message["options"] = options
    trace: dict[str, str] = {}
    if propagate is not None:
        propagate.inject(trace)
    return {"signature": message, "trace": trace}


def restore(app: Any, row: Any) -> tuple[Signature, dict[str, str]]:
    """The signature stored in ``row`` (bound to ``app``), and the caller's trace context."""
    data = row.body if isinstance(row.body, bytes) else bytes(row.body)
    stored = _loads(data, row.content_type, row.content_encoding, accept={row.content_type})
    options = stored["signature"].get("options") or {}
    for name in ("eta", "expires"):
        if isinstance(options.get(name), str):
            options[name] = datetime.datetime.fromisoformat(options[name])
    return app.signature(stored["signature"]), stored.get("trace") or {}


def paused() -> bool:
    """Whether the fast path leaves durable messages to the relay for now."""
    return time.monotonic() < _paused_until


def pause(exc: BaseException) -> None:
    """A durable publish failed: leave the next ones to the relay for :data:`PAUSE` seconds."""
    global _paused_until
    _paused_until = time.monotonic() + PAUSE
    logger.warning(
        "on_commit: a durable message could not be published (%s: %s); durable messages "
        "stay in the outbox for the relay for the next %.0f s",
        type(exc).__name__,
        exc,
        PAUSE,
    )


def delete_published(session: Session, task_ids: list[str]) -> None:
    """Delete the rows of messages the fast path published, in one short transaction of their
    own. Called once the committed transaction has ended (``after_transaction_end``), so its
    connection is back in the pool: concurrent commits never hold one connection while they
    wait for a second from a full pool. A failure is logged and counted: the relay sends
    those messages again (a duplicate, which idempotent runs absorb)."""
    bind = session.get_bind(Message)
    _delete(bind if isinstance(bind, Engine) else bind.engine, task_ids)


def _delete(engine: Engine, ids: list[str]) -> None:
    # One statement in autocommit: no BEGIN and COMMIT round trips around it.
    try:
        with at_isolation_level(engine, "AUTOCOMMIT").connect() as connection:
            connection.execute(_DELETE, {"ids": ids})
    except Exception:
        _delete_failed(len(ids))
    else:
        count("deleted", len(ids))


_DELETE = delete(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True)))


def _delete_failed(n: int) -> None:
    count("delete_failures")
    logger.exception(
        "on_commit: %d published message(s) stay in %s; the relay will send them again",
        n,
        outbox.name,
    )


def count(what: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[what] += n


def counts() -> dict[str, int]:
    """Rows this process deleted after the fast path published them, and deletes that failed."""
    with _counts_lock:
        return dict(_counts)


@dataclass(frozen=True)
class OutboxFacts:
    """What the check command found of the outbox; ``problem`` is empty when it is usable."""

    problem: str = ""
    pending: int = 0
    oldest_seconds: float = 0.0  # how long the oldest pending row has waited
    dead: int = 0


async def outbox_facts(conn: AsyncConnection) -> OutboxFacts:
    """The outbox in the database of ``conn``: missing, unusable, or its backlog."""
    problem = await table_problem(conn, outbox, "outbox_table")
    if problem:
        return OutboxFacts(problem)
    pending = outbox.c.dead_at.is_(None)
    row = (
        await conn.execute(
            select(
                func.count().filter(pending),
                func.min(outbox.c.created_at).filter(pending),
                func.count().filter(outbox.c.dead_at.is_not(None)),
                func.now() if conn.dialect.name == "postgresql" else func.current_timestamp(),
            )
        )
    ).one()
    count, oldest, dead, now = row
    waited = 0.0
    if oldest is not None:
        if isinstance(oldest, str):  # SQLite keeps times as text
            oldest, now = (
                datetime.datetime.fromisoformat(oldest),
                datetime.datetime.fromisoformat(now),
            )
        waited = max(0.0, (now.replace(tzinfo=None) - oldest.replace(tzinfo=None)).total_seconds())
    return OutboxFacts(pending=count, oldest_seconds=waited, dead=dead)
