"""Publish task messages when a session's outermost transaction commits (``on_commit``).

Queues are kept per SQLAlchemy ``SessionTransaction`` (of ``session.sync_session``), at the
transaction boundary where the call was made: the innermost SAVEPOINT, or the outermost
transaction. Four events of that session move them (SQLAlchemy, "Session Events"):

* ``after_commit`` with a SAVEPOINT still the innermost transaction: it was released; its
  calls join the enclosing transaction's queue, in order. ``after_commit`` also fires for a
  released SAVEPOINT, and is not a sign that anything reached the database.
* ``after_commit`` of the outermost transaction: the queue leaves, in order.
* ``after_transaction_end`` of a transaction whose queue is still there: it ended any other
  way (a rollback, ``close()``, which sends no ``after_rollback``, a failed COMMIT followed by
  a rollback or close, an invalidated connection): the queue is dropped. Keyed by the
  transaction object, a queue can never reach the session's next transaction anyway.

Nothing may block the event loop in ``after_commit``, which runs inside SQLAlchemy's
``greenlet_spawn``: there the handler awaits the publish (SQLAlchemy's ``await_``, the way its
asyncio dialects await the driver), so ``await session.commit()`` returns once the messages
have been handed to the broker, while the loop keeps running. In a task body the publish runs
in the worker's thread or greenlet (``in_worker``, where ``delay()`` from a body publishes);
elsewhere (a web app) in this process's publisher threads (``_publisher``), with the deadline
``async_session_publish_timeout``; cancelling the commit's caller does not cancel its
publish, so a COMMIT that succeeded is published (or its loss logged and counted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from celery.canvas import Signature
from celery.result import AsyncResult
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import concurrency

from . import _config, _outbox
from ._publisher import Expired, Job, QueueFull, publisher
from ._results import unsubscribed
from ._run import current_run, current_session, in_worker

logger = logging.getLogger("async_session_task")

#: ``await_`` since SQLAlchemy 2.1; ``await_only`` before (same function).
_await: Callable[[Any], Any] = getattr(concurrency, "await_", None) or concurrency.await_only

#: ``Session.info`` key of a sink that takes the signatures a commit would publish, instead
#: of publishing them (the sessions of ``testing.rollback_sessions``, which never commit).
CAPTURE = "async_session_task.on_commit"

#: A queued call: the signature, its task id, whether its row is in the outbox (durable).
_Queued = tuple[Signature, str, bool]

#: Calls waiting for their transaction, keyed by the transaction (gone with it if it is
#: dropped without an end event, e.g. a session garbage collected mid-transaction).
_queues: weakref.WeakKeyDictionary[SessionTransaction, list[_Queued]] = weakref.WeakKeyDictionary()
#: Sessions whose events are listened to: only those that ever queued a call, so a session
#: that queues nothing runs none of this code.
_listening: weakref.WeakSet[Session] = weakref.WeakSet()
#: Task ids of durable messages published after a commit, keyed by the committed
#: transaction: their rows are deleted once it has ended and released its connection.
_published: weakref.WeakKeyDictionary[SessionTransaction, list[str]] = weakref.WeakKeyDictionary()

_failures = 0
_failures_lock = threading.Lock()


def on_commit(
    signature: Signature,
    *,
    session: AsyncSession | Session | None = None,
    durable: bool | None = None,
) -> AsyncResult:
    """Publish ``signature`` once ``session``'s outermost transaction commits.

    ``signature`` is any Celery signature: ``task.s(...)``, ``task.si(...)``, a chain, a
    group. It is published after the COMMIT succeeded, in the order of the calls, and never if
    the transaction ends any other way (rollback, ``close()``, an exception that ends the run).
    A call made inside a SAVEPOINT (``begin_nested()``) joins the enclosing transaction when
    the SAVEPOINT is released, and is dropped if the SAVEPOINT is rolled back. Like
    ``session.add()``, it begins the session's transaction if none is in progress.

    Between the COMMIT and the publish there is a window: a publish that fails after the
    broker's retry policy is logged and counted, not raised (see ``docs/on-commit.md``).
    With ``durable=True`` the message is also written to the outbox table in the same
    transaction, and a relay delivers it if this process does not (``docs/outbox.md``).

    Args:
        signature: what to publish.
        session: an ``AsyncSession`` (or a ``Session``); default: the current run's
            session (:func:`~async_session_task.current_session`).
        durable: write the message to ``async_session_outbox`` with the transaction;
            default: the setting ``async_session_outbox`` (False).

    Returns:
        The result of the message to come: ``signature.freeze()``, so its id can be stored
        in the same transaction.

    Raises:
        RuntimeError: no ``session`` was given outside a task run.
        sqlalchemy.exc.InvalidRequestError: the session has ``autobegin=False`` and no
            transaction in progress.
        kombu.exceptions.EncodeError: ``durable`` and the signature cannot be serialized.
    """
    if session is None:
        if current_run.get() is None:
            raise RuntimeError(
                "on_commit() was called outside a task run without a session: pass the "
                "session whose commit should publish it, on_commit(sig, session=session)."
            )
        session = current_session()
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    if sync not in _listening:
        event.listen(sync, "after_commit", _after_commit)
        event.listen(sync, "after_transaction_end", _after_transaction_end)
        _listening.add(sync)
    # The innermost SAVEPOINT, or the outermost transaction; begun here if none is, as
    # Session.add() begins it (SQLAlchemy, "Autobegin"): a rollback or close() then drops
    # the call, where a call parked outside any transaction would outlive both.
    boundary = sync.get_nested_transaction() or sync._autobegin_t()
    while not boundary.nested and boundary.parent is not None:  # a flush's subtransaction
        boundary = boundary.parent
    result: AsyncResult = signature.freeze()
    if durable is None:
        durable = bool(signature.app.conf.get(_config.OUTBOX))
    if durable:
        _outbox.stage(sync, signature, result.id)
    _queues.setdefault(boundary, []).append((signature, result.id, durable))
    return result


def publish_failures() -> int:
    """Messages of committed transactions this process could not publish, since it started."""
    return _failures


def _after_commit(session: Session) -> None:
    nested = session.get_nested_transaction()
    if nested is not None:  # a SAVEPOINT was released: its calls join the enclosing one
        queued = _queues.pop(nested, None)
        if queued:
            enclosing = nested.parent
            assert enclosing is not None, "a SAVEPOINT always has an enclosing transaction"
            while not enclosing.nested and enclosing.parent is not None:
                enclosing = enclosing.parent
            _queues.setdefault(enclosing, []).extend(queued)
        return
    root = session.get_transaction()
    queued = _queues.pop(root, None) if root is not None else None
    if not queued or root is None:
        return
    sink = session.info.get(CAPTURE)
    if sink is not None:
        sink([(signature, task_id) for signature, task_id, _ in queued])
        return
    # A sync Session in sync code publishes right here: blocking is what its caller expects.
    published = _await(_hand_off(queued)) if concurrency.in_greenlet() else _publish(queued)
    durable = [task_id for task_id, is_durable in published if is_durable]
    if durable:
        _published[root] = durable


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # Still queued at the end: this transaction was not committed (after_commit took the
    # queue of one that was).
    _queues.pop(transaction, None)
    published = _published.pop(transaction, None)
    if published:  # its connection is back in the pool now (SessionTransaction.close)
        _outbox.delete_published(session, published)


async def _hand_off(queued: list[_Queued]) -> list[tuple[str, bool]]:
    """Publish ``queued`` off the loop and wait for it (cooperatively)."""
    if current_run.get() is not None:
        # A task body: in the worker's thread or greenlet, where its broker connection lives.
        return in_worker(_publish, queued)
    timeout = _config.publish_timeout(queued[0][0].app.conf)
    job = Job(time.monotonic() + timeout)
    try:
        # Whatever becomes of the caller, a job that expires before a thread takes it is
        # logged and counted (a started one logs its own failures). Cancelling the caller
        # (a commit cancelled after COMMIT: a timeout, a server shutting down) leaves the job
        # alone: the message is published.
        answer = publisher().answer_on(
            asyncio.get_running_loop(),
            job,
            _publish_off_loop,
            queued,
            expired=lambda exc: _lost(queued, exc),
        )
    except QueueFull as exc:
        _lost(queued, exc)
        return []
    # Bounded: the commit waits for its own deadline, not for the failures of every publish
    # queued before it.
    try:
        async with asyncio.timeout(timeout):
            return await answer
    except TimeoutError:
        job.abandon()  # not started: never will be (and is counted); started: finishes
        return []
    except Expired:
        return []


def _publish_off_loop(queued: list[_Queued]) -> list[tuple[str, bool]]:
    """:func:`_publish` in a publisher thread."""
    for app in {signature.app for signature, _, _ in queued}:
        unsubscribed(app)
    return _publish(queued)


def _lost(queued: list[_Queued], exc: BaseException | None) -> None:
    """Count and log the messages of ``queued`` that were never attempted; a durable one's
    row is still there, for the relay."""
    for signature, task_id, durable in queued:
        if durable:
            _outbox.count("left_to_relay")
        else:
            _failed(signature, task_id, exc)


def _failed(signature: Signature, task_id: str, exc: BaseException | None) -> None:
    """Count and log a message of a committed transaction that was not published."""
    global _failures
    with _failures_lock:
        _failures += 1
    logger.error(
        "on_commit: %s[%s] was committed but could not be published",
        signature.get("task") or type(signature).__name__,
        task_id,
        exc_info=exc,
    )


def _publish(queued: list[_Queued]) -> list[tuple[str, bool]]:
    """Publish each message, in order; a failure is logged and counted, never raised: the
    transaction is committed, and the caller must not take it for a failed commit. Returns
    the task ids published, each with whether it is durable.

    A durable message is published without Celery's retries, and not at all for a few
    seconds after one failed: if the broker is down, its row waits for the relay rather than
    the caller for the broker."""
    published = []
    for signature, task_id, durable in queued:
        if durable and _outbox.paused():
            _outbox.count("left_to_relay")
            continue
        try:
            if durable:
                signature.apply_async(retry=False)
            else:
                signature.apply_async()
            published.append((task_id, durable))
        except Exception as exc:
            if durable:  # not lost: its row is committed, and the relay will send it
                _outbox.count("left_to_relay")
                _outbox.pause(exc)
                continue
            _failed(signature, task_id, exc)
    return published
