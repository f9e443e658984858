"""The relay: publishes the outbox rows that the fast path did not (the broker was down, the
process died between COMMIT and publish), then deletes them (docs/outbox.md#the-relay).

A row is due once it is ``grace`` seconds past its ``available_at``: the fast path has had
that long to publish and delete it. A relay claims a batch of due rows in one statement
(``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``), which also leases
them (``lease``, a token of this claim, and an ``available_at`` pushed past the lease), so
any number of relays share a table without taking the same row, through PgBouncer's
transaction pooling too: each statement is its own transaction. It publishes each message
with its stored task id, then deletes the rows it still holds the lease of. A broker that
refuses ends the batch: its rows are released, and the relay backs off with jitter. A row
that fails by itself (it cannot be decoded or published) is retried later, and moved to the
dead letters (``dead_at``) after ``dead_after`` attempts, logged once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import logging
import random
import uuid
from collections.abc import Sequence
from typing import Any

from kombu.exceptions import OperationalError
from sqlalchemy import and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _config
from ._outbox import restore
from ._tables import missing_table_hint, outbox, server_time

logger = logging.getLogger("async_session_task")

otel_context: Any
try:  # optional: publish in the caller's trace context
    otel_context = importlib.import_module("opentelemetry.context")
except ImportError:  # OpenTelemetry is not a dependency
    otel_context = None


@dataclasses.dataclass
class Options:
    """How a relay works; the defaults are the command's."""

    batch: int = 100  # rows claimed per statement
    grace: float = 10.0  # seconds a new row is left to the fast path
    lease: float = 60.0  # seconds a claimed row is this relay's
    dead_after: int = 10  # attempts before a failing row becomes a dead letter
    poll: float = 1.0  # seconds between looks at an empty table
    backoff_cap: float = 30.0  # the longest wait after a refusing broker

    @classmethod
    def of(cls, app: Any, **given: Any) -> Options:
        """The defaults, with ``async_session_outbox_grace`` from ``app.conf``, then ``given``
        (what is None there is not given)."""
        options = {name: value for name, value in given.items() if value is not None}
        grace = app.conf.get(_config.OUTBOX_GRACE)
        if grace is not None:
            options.setdefault("grace", float(grace))
        return cls(**options)


@dataclasses.dataclass
class Outcome:
    """What one batch came to."""

    claimed: int = 0
    published: int = 0
    failed: int = 0  # rows that failed by themselves (retried later, or dead)
    dead: int = 0
    broker_down: bool = False


class Relay:
    """The relay of one database (``engine``) for one Celery ``app``."""

    def __init__(self, app: Any, engine: AsyncEngine, options: Options | None = None) -> None:
        self.app = app
        self.engine = engine
        self.options = options or Options()
        connection = app.connection_for_write()
        self._transient = (OSError, OperationalError, *connection.connection_errors)
        # One thread publishes: Celery's client objects stay in one thread (celery/celery#4480).
        self._publisher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="async_session_task-relay"
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver batches until ``stop`` is set; wait ``poll`` when nothing is due, back off
        (doubling, with jitter) while the broker or the database refuses."""
        failures = 0
        while not stop.is_set():
            try:
                outcome = await self.run_once()
            except Exception as exc:
                hint = missing_table_hint(exc, outbox, "outbox_table")
                if hint is not None:  # until a migration adds it
                    logger.error("relay: %s (%s; docs/outbox.md#the-table)", hint, self._where())
                else:
                    logger.exception("relay: the outbox of %s could not be read", self._where())
                outcome = Outcome(broker_down=True)
            if outcome.broker_down:
                failures += 1
                cap = min(self.options.backoff_cap, self.options.poll * 2**failures)
                delay = random.uniform(cap / 2, cap)
            else:
                failures = 0
                if outcome.claimed == self.options.batch:
                    continue  # more may be due
                delay = self.options.poll
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def run_once(self) -> Outcome:
        """Claim one batch of due rows, publish them, delete or release them."""
        token = uuid.uuid4().hex
        rows = await self._claim(token)
        outcome = Outcome(claimed=len(rows))
        if not rows:
            return outcome
        results = await asyncio.get_running_loop().run_in_executor(
            self._publisher, self._publish, rows
        )
        published = [row.id for row, error in zip(rows, results, strict=True) if error is None]
        refused = [row.id for row, error in zip(rows, results, strict=True) if error is _REFUSED]
        outcome.published = len(published)
        outcome.broker_down = bool(refused)
        dialect = self.engine.dialect.name
        async with self.engine.begin() as conn:
            if published:
                await conn.execute(
                    delete(outbox).where(outbox.c.lease == token, outbox.c.id.in_(published))
                )
            if refused:  # not the rows' fault: no attempt counted
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.lease == token, outbox.c.id.in_(refused))
                    .values(
                        lease=None,
                        available_at=server_time(dialect, _seconds(-self.options.grace)),
                    )
                )
            for row, error in zip(rows, results, strict=True):
                if error is None or error is _REFUSED:
                    continue
                outcome.failed += 1
                outcome.dead += await self._failed(conn, token, row, error)
        return outcome

    async def _claim(self, token: str) -> Sequence[Any]:
        options, dialect = self.options, self.engine.dialect.name
        due = (
            select(outbox.c.id)
            .where(
                outbox.c.dead_at.is_(None),
                outbox.c.available_at <= server_time(dialect, _seconds(-options.grace)),
            )
            .order_by(outbox.c.available_at)
            .limit(options.batch)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(outbox)
            .where(outbox.c.id.in_(due.scalar_subquery()))
            .values(
                lease=token,
                available_at=server_time(dialect, _seconds(options.lease - options.grace)),
            )
            .returning(
                outbox.c.id,
                outbox.c.task_name,
                outbox.c.content_type,
                outbox.c.content_encoding,
                outbox.c.body,
                outbox.c.attempts,
            )
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(claim)).all()
        return sorted(rows, key=lambda row: row.id)

    def _publish(self, rows: Sequence[Any]) -> list[BaseException | None]:
        """In the publisher thread: publish each row, on one producer for the batch; None, the
        row's own error, or :data:`_REFUSED` for it and every row after it once the broker
        refused one."""
        results: list[BaseException | None] = []
        try:
            with self.app.producer_or_acquire() as producer:
                for row in rows:
                    if results and results[-1] is _REFUSED:
                        results.append(_REFUSED)
                        continue
                    results.append(self._publish_one(row, producer))
        except self._transient as exc:  # the producer itself could not connect
            logger.warning("relay: the broker refused (%s: %s)", type(exc).__name__, exc)
        return results + [_REFUSED] * (len(rows) - len(results))

    def _publish_one(self, row: Any, producer: Any) -> BaseException | None:
        try:
            signature, trace = restore(self.app, row)
        except Exception as exc:
            return exc
        attached = None
        if otel_context is not None and trace:
            propagate = importlib.import_module("opentelemetry.propagate")
            attached = otel_context.attach(propagate.extract(trace))
        try:
            signature.apply_async(retry=False, producer=producer)
        except self._transient as exc:
            logger.warning("relay: the broker refused %s (%s: %s)", row.id, type(exc).__name__, exc)
            return _REFUSED
        except Exception as exc:
            return exc
        finally:
            if attached is not None:
                otel_context.detach(attached)
        return None

    async def _failed(self, conn: Any, token: str, row: Any, error: BaseException) -> int:
        """Count a failed attempt of ``row``: retry it later, or make it a dead letter (1)."""
        attempts = row.attempts + 1
        dead = attempts >= self.options.dead_after
        delay = min(self.options.backoff_cap, 2.0**attempts) * random.uniform(0.5, 1.0)
        dialect = self.engine.dialect.name
        await conn.execute(
            update(outbox)
            .where(and_(outbox.c.id == row.id, outbox.c.lease == token))
            .values(
                lease=None,
                attempts=attempts,
                last_error=f"{type(error).__name__}: {error}"[:2000],
                available_at=server_time(dialect, _seconds(delay - self.options.grace)),
                dead_at=server_time(dialect, _seconds(0)) if dead else None,
            )
        )
        if dead:
            logger.error(
                "relay: %s[%s] failed %d times and is a dead letter now (last: %s: %s); "
                "it stays in %s with dead_at set (docs/outbox.md#dead-letters)",
                row.task_name, row.id, attempts, type(error).__name__, error, outbox.name,
            )  # fmt: skip
        else:
            logger.warning(
                "relay: %s[%s] failed (attempt %d of %d): %s: %s",
                row.task_name, row.id, attempts, self.options.dead_after,
                type(error).__name__, error,
            )  # fmt: skip
        return int(dead)

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._publisher.shutdown(wait=True)


class _Refused(Exception):
    """The broker refused the connection: the rows are not at fault."""


_REFUSED = _Refused()


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
