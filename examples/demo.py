"""The demo: a real ``celery worker`` runs a few hundred ``async def`` tasks on SQLite.

    python3 -m pip install -e '.[sqlite]' && python3 examples/demo.py

Nothing to install or start: the data lives in SQLite (through aiosqlite), the broker is
kombu's filesystem transport and the results are files, all in a temporary directory. The
same demo runs on PostgreSQL and Redis when given their URLs (flags or environment variables
``DEMO_DATABASE_URL``, ``DEMO_BROKER_URL``, ``DEMO_RESULT_BACKEND``)::

    python3 examples/demo.py --database-url postgresql+asyncpg://user@127.0.0.1/dbname \\
        --broker-url redis://127.0.0.1:6379/0

Each task moves an amount between two accounts: it locks both, writes both balances and a
transfer row, and commits. Every 25th transfer fails once after writing (a
stand-in for a dropped connection) and is retried with backoff; its uncommitted writes are
rolled back when its session closes, so the total of all balances never changes.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Celery, signals
from sqlalchemy import ForeignKey, Integer, String, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import Pool

from async_session_task import AsyncSessionTask, current_session
from async_session_task.testing import file_broker_settings, worker_process

ACCOUNTS = 20
OPENING_BALANCE = 1_000
#: Every 25th transfer fails once after writing, and is retried.
FLAKY_EVERY = 25


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "ast_demo_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    balance: Mapped[int] = mapped_column(Integer)


class Transfer(Base):
    __tablename__ = "ast_demo_transfers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    source: Mapped[int] = mapped_column(ForeignKey(Account.id))
    target: Mapped[int] = mapped_column(ForeignKey(Account.id))
    amount: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(40))


# What the worker process did, counted where it happened and written to a file when the
# worker process exits, so the summary reports real numbers.
_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def _count(name: str) -> None:
    with _counts_lock:
        _counts[name] += 1


class CountingSession(AsyncSession):
    """The session class of every run (``async_session_options={"class_": ...}``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _count("sessions opened")

    async def close(self) -> None:
        await super().close()
        _count("sessions closed")


event.listen(Pool, "connect", lambda *_: _count("connections opened"))
event.listen(Pool, "close", lambda *_: _count("connections closed"))


class TransientError(Exception):
    """Stands in for a dropped connection or a serialization failure: worth a retry."""


app = Celery("demo")


def configure() -> None:
    """Read the URLs from the environment: the demo sets them for its worker process."""
    state = Path(os.environ.get("DEMO_STATE_DIR") or Path(tempfile.gettempdir(), "ast-demo"))
    # No URLs given: kombu's filesystem transport and file results, in a folder shared by
    # the demo and its worker.
    app.conf.update(file_broker_settings(state))
    if os.environ.get("DEMO_BROKER_URL"):
        app.conf.update(
            broker_url=os.environ["DEMO_BROKER_URL"],
            broker_transport=None,
            broker_transport_options={},
        )
    if os.environ.get("DEMO_RESULT_BACKEND"):
        app.conf.result_backend = os.environ["DEMO_RESULT_BACKEND"]
    app.conf.update(
        async_session_url=(
            os.environ.get("DEMO_DATABASE_URL") or f"sqlite+aiosqlite:///{state / 'demo.db'}"
        ),
        # The session class counts opens and closes for the summary; any AsyncSession works.
        async_session_options={"class_": CountingSession},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )


configure()


async def lock_balances(*ids: int) -> dict[int, int]:
    """The accounts' balances, their rows locked for this transaction in one order (lowest
    id first): two transfers between the same accounts in opposite directions then wait for
    each other instead of deadlocking. (SQLite has no row locks; it runs one writer at a
    time.)"""
    query = (
        select(Account.id, Account.balance)
        .where(Account.id.in_(ids))
        .order_by(Account.id)
        .with_for_update()
    )
    return dict((await current_session().execute(query)).tuples().all())


@app.task(
    bind=True,
    base=AsyncSessionTask,
    # Transient errors are retried with exponential backoff (1 s, 2 s, ... with jitter).
    autoretry_for=(TransientError, OperationalError),
    retry_backoff=True,
    retry_backoff_max=4,
    max_retries=5,
)
async def transfer(
    self: AsyncSessionTask, number: int, source: int, target: int, amount: int, flaky: bool
) -> dict[str, Any]:
    session = self.session
    moved = min(amount, (await lock_balances(source, target))[source])
    # Relative updates: on SQLite, where nothing is locked, no concurrent write is lost.
    await session.execute(
        update(Account).where(Account.id == source).values(balance=Account.balance - moved)
    )
    await session.execute(
        update(Account).where(Account.id == target).values(balance=Account.balance + moved)
    )
    session.add(Transfer(number=number, source=source, target=target, amount=moved, note="ok"))
    await session.flush()
    if flaky and self.request.retries == 0:
        # The writes above are not committed: closing the session rolls them back.
        raise TransientError(f"transfer {number}: connection lost (on purpose)")
    await session.commit()
    return {"number": number, "retries": self.request.retries, "pid": os.getpid()}


def _write_counts(**_: Any) -> None:
    # Connected after the library's own shutdown handlers, so the engines are disposed
    # (and their connections counted as closed) by the time this runs.
    state = os.environ.get("DEMO_STATE_DIR")
    with _counts_lock:
        counts = dict(_counts)
    if state and counts.get("sessions opened"):
        Path(state, f"worker-{os.getpid()}.json").write_text(json.dumps(counts))


signals.worker_process_shutdown.connect(_write_counts, weak=False)
signals.worker_shutdown.connect(_write_counts, weak=False)


# ---- the demo itself: runs in your terminal, sends the tasks, waits, sums up -------------


async def _prepare(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            # Readers do not wait for writers (SQLite's write-ahead log).
            await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            insert(Account),
            [{"id": i, "balance": OPENING_BALANCE} for i in range(1, ACCOUNTS + 1)],
        )
    await engine.dispose()


async def _totals(url: str) -> tuple[int, int]:
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        balance = await connection.scalar(select(func.sum(Account.balance)))
        transfers = await connection.scalar(select(func.count()).select_from(Transfer))
    await engine.dispose()
    return int(balance or 0), int(transfers or 0)


class Progress:
    """A one-line progress bar on a terminal; a line per quarter otherwise (logs, CI)."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width = total, width
        self.tty = sys.stdout.isatty()
        self.started = time.monotonic()
        self._shown = 0

    def show(self, done: int) -> None:
        if self.tty:
            filled = self.width * done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            elapsed = time.monotonic() - self.started
            print(f"\r  [{bar}] {done}/{self.total}  {elapsed:5.1f} s", end="", flush=True)
            if done == self.total:
                print()
        elif done * 4 // self.total > self._shown:
            self._shown = done * 4 // self.total
            print(f"  {done}/{self.total} results", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=300, help="how many transfers (300)")
    parser.add_argument("--pool", default="threads", choices=["threads", "prefork", "solo"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database-url", default=os.environ.get("DEMO_DATABASE_URL"))
    parser.add_argument("--broker-url", default=os.environ.get("DEMO_BROKER_URL"))
    parser.add_argument(
        "--result-backend",
        default=os.environ.get("DEMO_RESULT_BACKEND"),
        help="default: the broker URL if it is Redis, else files",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for all results")
    options = parser.parse_args(argv)
    if options.tasks < 1:
        parser.error("--tasks must be at least 1")
    result_backend = options.result_backend
    if result_backend is None and (options.broker_url or "").startswith("redis"):
        result_backend = options.broker_url

    if not options.database_url and importlib.util.find_spec("aiosqlite") is None:
        parser.exit(2, "The demo needs aiosqlite: python3 -m pip install -e '.[sqlite]'\n")

    with tempfile.TemporaryDirectory(prefix="async-session-demo-") as state:
        settings = {
            "DEMO_STATE_DIR": state,
            "DEMO_DATABASE_URL": options.database_url or "",
            "DEMO_BROKER_URL": options.broker_url or "",
            "DEMO_RESULT_BACKEND": result_backend or "",
        }
        os.environ.update(settings)
        configure()
        url = app.conf.async_session_url
        asyncio.run(_prepare(url))
        examples = str(Path(__file__).resolve().parent)
        path = os.pathsep.join(filter(None, [examples, os.environ.get("PYTHONPATH")]))
        print(f"database: {_display(url)}")
        print(f"broker:   {_display(app.conf.broker_url)}")
        print(f"results:  {_display(app.conf.result_backend)}")
        print(f"starting: celery -A demo worker -P {options.pool} -c {options.concurrency}")
        with worker_process(
            app,
            "demo",
            pool=options.pool,
            concurrency=options.concurrency,
            env={**settings, "PYTHONPATH": path},
        ) as worker:
            outcome = _run(worker, options.tasks, options.timeout)
            print("stopping the worker (warm shutdown) ...")
            code = worker.stop()
            if code != 0:
                print(worker.log[-3000:], file=sys.stderr)
        counts: Counter[str] = Counter()
        for stats in Path(state).glob("worker-*.json"):
            counts.update(json.loads(stats.read_text()))
        balance, transfers = asyncio.run(_totals(url))
    return _summary(options, outcome, counts, balance, transfers, code)


def _display(url: str) -> str:
    """A URL without its password."""
    if "://" in url and not url.startswith(("filesystem", "file")):
        try:
            return make_url(url).render_as_string(hide_password=True)
        except Exception:
            return url.split("@")[-1]
    return url


def _run(worker: Any, tasks: int, timeout: float) -> dict[str, Any]:
    rng = random.Random(2024)
    started = time.monotonic()
    pending = []
    for number in range(1, tasks + 1):
        source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
        flaky = number % FLAKY_EVERY == 0
        pending.append(worker.send(transfer, number, source, target, rng.randint(1, 100), flaky))
    print(f"sent {tasks} tasks; waiting for the results:")
    progress = Progress(tasks)
    reports, failures = [], []
    deadline = started + timeout
    while pending and time.monotonic() < deadline:
        still = []
        for result in pending:
            if not result.ready():
                still.append(result)
            elif result.successful():
                reports.append(result.result)
            else:
                failures.append(repr(result.result))
        pending = still
        progress.show(tasks - len(pending))
        if pending:
            time.sleep(0.05)
    elapsed = time.monotonic() - started
    return {
        "elapsed": elapsed,
        "reports": reports,
        "failures": failures,
        "missing": len(pending),
    }


def _summary(
    options: argparse.Namespace,
    outcome: dict[str, Any],
    counts: Counter[str],
    balance: int,
    transfers: int,
    stop_code: int,
) -> int:
    reports = outcome["reports"]
    elapsed = outcome["elapsed"]
    retried = sum(1 for report in reports if report["retries"])
    expected_balance = ACCOUNTS * OPENING_BALANCE
    processes = len({report["pid"] for report in reports})
    print()
    print("summary")
    print(
        f"  tasks:        {len(reports)} succeeded of {options.tasks}, in {elapsed:.1f} s "
        f"({len(reports) / elapsed:.0f} tasks/s), {processes} worker process(es)"
    )
    print(
        f"  sessions:     {counts['sessions opened']} opened, {counts['sessions closed']} closed "
        "(one per run, retries included)"
    )
    print(
        f"  connections:  {counts['connections opened']} opened for all those sessions, "
        f"{counts['connections closed']} closed at shutdown"
    )
    print(
        f"  retried:      {retried} tasks failed and then succeeded on retry "
        f"({options.tasks // FLAKY_EVERY} of them failed on purpose)"
    )
    print(f"  failed:       {len(outcome['failures'])}, not finished: {outcome['missing']}")
    print(
        f"  data:         {transfers} transfers committed, total balance {balance} "
        f"(expected {expected_balance})"
    )
    ok = (
        not outcome["failures"]
        and not outcome["missing"]
        and balance == expected_balance
        and transfers == options.tasks
        and counts["sessions opened"] == counts["sessions closed"] > 0
        and stop_code == 0
    )
    print("  result:       " + ("OK" if ok else "PROBLEM (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
