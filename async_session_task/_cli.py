"""``celery -A proj async-session check|relay``: the package's commands.

Registered in the ``celery.commands`` entry point group, as Flower registers ``celery flower``
(Celery's CLI adds every command of that group), and reachable as
``python -m async_session_task check -A proj``.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click
from celery.app.utils import find_app
from celery.bin.base import CeleryCommand

from . import _pools
from ._check import ERROR, run_check
from ._relay import Options
from ._relay_service import relay_all


@click.group(name="async-session")
def async_session() -> None:
    """async_session_task commands."""


def _app(ctx: click.Context, app_name: str | None, command: str) -> Any:
    if app_name is not None:
        return find_app(app_name)
    if getattr(ctx.obj, "app", None) is not None:
        return ctx.obj.app
    raise click.UsageError(f"give the app: -A proj (or celery -A proj async-session {command})")


@async_session.command(cls=CeleryCommand)
@click.option("-A", "--app", "app_name", help="The app, as for celery -A (else celery's -A).")
@click.option("-P", "--pool", type=click.Choice(_pools.POOLS), help="Default: worker_pool.")
@click.option("-c", "--concurrency", type=int, help="Default: worker_concurrency, else CPUs.")
@click.option("--cleanup", is_flag=True, help="Delete run markers older than the retention.")
@click.pass_context
def check(
    ctx: click.Context,
    app_name: str | None,
    pool: str | None,
    concurrency: int | None,
    cleanup: bool,
) -> None:
    """Check what a worker of the app would meet: sessions, database, budget, PgBouncer."""
    rows = run_check(_app(ctx, app_name, "check"), pool, concurrency, cleanup)
    for row in rows:
        click.echo(f"{row.status:<5}  {row.check:<18}  {row.detail}")
    errors = sum(row.status == ERROR for row in rows)
    click.echo(f"{errors} error(s)" if errors else "no errors")
    ctx.exit(1 if errors else 0)


@async_session.command(cls=CeleryCommand)
@click.option("-A", "--app", "app_name", help="The app, as for celery -A (else celery's -A).")
@click.option("--once", is_flag=True, help="Deliver what is due, then exit.")
@click.option("--batch", type=click.IntRange(1), default=Options.batch, show_default=True)
@click.option(
    "--grace", type=click.FloatRange(0), help="Default: async_session_outbox_grace, else 10."
)
@click.option("--poll", type=click.FloatRange(0.01), default=Options.poll, show_default=True)
@click.pass_context
def relay(
    ctx: click.Context,
    app_name: str | None,
    once: bool,
    batch: int,
    grace: float | None,
    poll: float,
) -> None:
    """Deliver the outbox's messages that were not published after their commit."""
    app = _app(ctx, app_name, "relay")
    app.loader.import_default_modules()
    options = Options.of(app, batch=batch, grace=grace, poll=poll)

    async def main() -> int:
        if once:
            return await relay_all(app, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        click.echo("relay: started; SIGTERM or Ctrl-C stops it")
        await relay_all(app, options, stop)
        return 0

    published = asyncio.run(main())
    if once:
        click.echo(f"relay: published {published} message(s)")
