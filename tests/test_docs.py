"""Every code example in ``docs/`` runs here: pages include Python only from files, and each
of those files is executed below (``examples/`` by test_examples.py and test_demo.py). And
every source the repository cites can be opened: an anchor of docs/internals.md, or upstream."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from async_session_task import AsyncSessionTask
from tests.helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)[^\n]*\n(.*?)^\1\s*$", re.MULTILINE | re.DOTALL)
SNIPPET = re.compile(r'^--8<--\s+"([^":]+)(?::[^"]*)?"\s*$')

#: The files the tests below (and those of examples/) execute.
EXECUTED = {
    "docs/examples/quickstart.py",
    "docs/examples/configuration.py",
    "docs/examples/models.py",
    "docs/examples/current_session.py",
    "docs/examples/migrating_sync.py",
    "docs/examples/migrating_asyncio_run.py",
    "docs/examples/migrated.py",
    "docs/examples/deployment.py",
    "docs/examples/faq_different_loop.py",
    "docs/examples/observability.py",
    "docs/examples/testing_lifespan.py",  # by tests/apps/lifespan_app.py, in test_lifespan.py
    "docs/examples/testing/conftest.py",
    "docs/examples/testing/test_orders.py",
    "docs/examples/on_commit_testing.py",
    "tests/typing/calls.py",  # checked by mypy, run by tests/test_typed.py
    "examples/demo.py",
    "examples/settings.py",
    "examples/shop/db.py",
    "examples/shop/models.py",
    "examples/shop/repository.py",
    "examples/shop/api.py",
    "examples/shop/tasks.py",
    "examples/shop/__main__.py",
    "examples/retrying.py",
    "examples/running_once.py",
    "examples/outbox.py",
    "examples/time_limits.py",
    "examples/fanout.py",
    "examples/fastapi_orders/db.py",
    "examples/fastapi_orders/models.py",
    "examples/fastapi_orders/tasks.py",
    "examples/fastapi_orders/web.py",
    "examples/lifespan.py",
}


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        for match in FENCE.finditer(page.read_text()):
            if match.group(2) in {"python", "py", "pycon"}:
                blocks.append((page.name, match.group(3)))
    return blocks


def test_every_python_example_in_the_docs_is_an_executed_file() -> None:
    blocks = python_blocks()
    assert blocks, "no Python examples found in docs/*.md"
    included = set()
    for page, body in blocks:
        for line in body.strip().splitlines():
            snippet = SNIPPET.match(line.strip())
            assert snippet, f"{page}: inline Python; put it in docs/examples/ and include it"
            included.add(snippet.group(1))
    assert included <= EXECUTED, included - EXECUTED
    missing = [path for path in EXECUTED if not (ROOT / path).is_file()]
    assert not missing


def sqlite(tmp_path: Path, name: str) -> tuple[str, str]:
    """(asyncio URL, sync URL) of a new SQLite file."""
    path = tmp_path / f"{name}.db"
    return f"sqlite+aiosqlite:///{path}", f"sqlite:///{path}"


def create_tables(sync_url: str, metadata: Any) -> None:
    engine = create_engine(sync_url)
    metadata.create_all(engine)
    engine.dispose()


def rows(sync_url: str, sql: str) -> list[Any]:
    engine = create_engine(sync_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql)))
    finally:
        engine.dispose()


def test_quickstart(tmp_path: Path) -> None:
    from docs.examples import quickstart

    url, sync_url = sqlite(tmp_path, "quickstart")
    quickstart.app.conf.async_session_url = url  # instead of the page's PostgreSQL
    create_tables(sync_url, quickstart.Base.metadata)
    with Session(create_engine(sync_url)) as session, session.begin():
        session.add(quickstart.Book(id=1, title="Draft"))
    assert quickstart.rename.apply(args=(1, "Final")).get() == "Final"
    assert quickstart.inventory.apply().get() == "1 books"
    assert rows(sync_url, "select title from books") == [("Final",)]


def test_configuration_precedence(tmp_path: Path) -> None:
    """app.conf for every task; the WarehouseTask class attribute beats it."""
    from docs.examples import configuration

    shop, shop_sync = sqlite(tmp_path, "shop")
    warehouse, warehouse_sync = sqlite(tmp_path, "warehouse")
    configuration.app.conf.update(
        async_session_url=shop, async_session_engine_options={"pool_pre_ping": True}
    )
    configuration.WarehouseTask.async_session_url = warehouse
    for sync_url in (shop_sync, warehouse_sync):
        create_tables(sync_url, configuration.Base.metadata)
    assert configuration.record.apply(args=("sold",)).get() == 1
    assert configuration.record_in_warehouse.apply(args=("shipped",)).get() == 1
    assert rows(shop_sync, "select name from events") == [("sold",)]
    assert rows(warehouse_sync, "select name from events") == [("shipped",)]


def test_current_session_and_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three versions of one task (sync, asyncio.run, this library) agree."""
    from docs.examples import (
        current_session,
        migrated,
        migrating_asyncio_run,
        migrating_sync,
        models,
    )

    url, sync_url = sqlite(tmp_path, "crm")
    create_tables(sync_url, models.Base.metadata)
    with Session(create_engine(sync_url)) as session, session.begin():
        session.add(models.Customer(id=7, email="ada@example.com"))

    engine = create_engine(sync_url)
    migrating_sync.SyncSession.configure(bind=engine)
    assert migrating_sync.customer_id.apply(args=("ada@example.com",)).get() == 7
    engine.dispose()

    monkeypatch.setattr(migrating_asyncio_run, "DATABASE_URL", url)
    assert migrating_asyncio_run.customer_id.apply(args=("ada@example.com",)).get() == 7

    migrated.app.conf.async_session_url = url
    assert migrated.customer_id.apply(args=("ada@example.com",)).get() == 7

    app = Celery("docs-current-session", set_as_current=False)
    app.conf.async_session_url = url

    @app.task(base=AsyncSessionTask, shared=False)
    async def email_known(email: str) -> bool:
        return await current_session.find_customer(email) is not None

    assert email_known.apply(args=("ada@example.com",)).get() is True
    assert email_known.apply(args=("bob@example.com",)).get() is False


def test_on_commit_testing(tmp_path: Path) -> None:
    """The test on the Publishing after commit page, on SQLite."""
    from docs.examples import on_commit_testing

    url, sync_url = sqlite(tmp_path, "billing")
    on_commit_testing.app.conf.update(async_session_url=url, broker_url="memory://")
    create_tables(sync_url, on_commit_testing.Base.metadata)
    on_commit_testing.test_issuing_queues_the_sending()
    assert rows(sync_url, "select count(*) from invoices") == [(0,)]  # rolled back


def run_pytest(target: str, tmp_path: Path) -> str:
    """``pytest target`` as a user runs it (SQLite, no server); its output, once it passed."""
    env = {**os.environ, "EXAMPLES_STATE_DIR": str(tmp_path)}
    for name in ("EXAMPLES_DATABASE_URL", "EXAMPLES_BROKER_URL", "EXAMPLES_QUEUE"):
        env.pop(name, None)
    process = run_python("-m", "pytest", target, "-p", "no:cacheprovider", "-q", env=env)
    assert process.returncode == 0, process.stdout + process.stderr
    return process.stdout


@pytest.mark.timeout(120)
def test_the_testing_page_suite_passes(tmp_path: Path) -> None:
    """docs/examples/testing: a user's conftest and tests, run as pytest would run them."""
    assert "3 passed" in run_pytest("docs/examples/testing", tmp_path)


@pytest.mark.timeout(120)
def test_the_lifespan_substitute_test_passes(tmp_path: Path) -> None:
    """docs/examples/testing_lifespan.py, run as pytest would run it."""
    assert "1 passed" in run_pytest("docs/examples/testing_lifespan.py", tmp_path)


@pytest.mark.services
def test_deployment_engine_options(database_url: str) -> None:
    """Both option sets are accepted by asyncpg; DIRECT's statement_timeout reaches the server
    (the PgBouncer preset on a real PgBouncer: tests/faults/test_pgbouncer.py)."""
    from docs.examples import deployment

    app = Celery("docs-deployment", set_as_current=False)

    class Direct(AsyncSessionTask):
        abstract = True
        async_session_url = database_url
        async_session_engine_options = deployment.DIRECT

    class Pooled(AsyncSessionTask):
        abstract = True
        async_session_url = database_url
        async_session_engine_options = deployment.PGBOUNCER

    @app.task(bind=True, base=Direct, shared=False)
    async def timeout_setting(self: AsyncSessionTask) -> str:
        return str(await self.session.scalar(text("show statement_timeout")))

    @app.task(bind=True, base=Pooled, shared=False)
    async def twice(self: AsyncSessionTask) -> list[int]:
        query = text("select cast(:x as integer) + 1")
        return [await self.session.scalar(query, {"x": x}) for x in (1, 1)]

    assert timeout_setting.apply().get() == "25s"
    assert twice.apply().get() == [2, 2]


FAQ_RUN = """
import sys
from sqlalchemy.ext.asyncio import create_async_engine
from docs.examples import faq_different_loop as faq
faq.engine = create_async_engine(sys.argv[1])
print("first:", faq.task_body())
try:
    faq.task_body()
except RuntimeError as error:
    print("second:", error)
"""


@pytest.mark.services
def test_faq_different_loop_is_what_the_faq_says(database_url: str) -> None:
    """In a process of its own: it leaves a connection of a closed loop behind, as the FAQ
    says (docs/internals.md#loop-bound-connections, docs/internals.md#dispose-on-loop)."""
    process = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", FAQ_RUN, database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "first: 1" in process.stdout, process.stdout + process.stderr
    assert "attached to a different loop" in process.stdout, process.stdout + process.stderr
    assert "unclosed connection" in process.stderr, process.stderr


#: Where comments and pages may cite sources: only what a maintainer can open.
SCANNED = ("async_session_task/", "tests/", "docs/", "examples/", "benchmarks/", "README.md")
#: A name for a document outside the repository, and numbered items of no tracker anyone can
#: open. Built from parts, so that this file does not match them.
UNFOLLOWABLE = (
    re.compile("TRA" + "PS"),
    re.compile(r"\biss" + r"ue \d+\b", re.IGNORECASE),
)
INTERNALS = DOCS / "internals.md"
ANCHOR = re.compile(r"\{#([\w-]+)\}")
CITED_ANCHOR = re.compile(r"internals\.md#([\w-]+)")
SECTION_LINK = re.compile(r"\]\(#([\w-]+)\)")


def tracked_text_files(*prefixes: str) -> list[tuple[str, str]]:
    """(path, text) of the files git tracks under ``prefixes`` (all of them if none)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--", *prefixes],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for path in filter(None, listing.split("\0")):
        try:
            files.append((path, (ROOT / path).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the work tree
    return files


def test_sources_cite_only_what_a_maintainer_can_open() -> None:
    """Comments, docstrings and pages cite docs/internals.md or upstream, nothing else."""
    files = tracked_text_files(*SCANNED)
    assert any(path == "README.md" for path, _ in files), "git ls-files listed nothing"
    hits = [
        f"{path}:{number}: {line.strip()}"
        for path, text in files
        for number, line in enumerate(text.splitlines(), start=1)
        if any(pattern.search(line) for pattern in UNFOLLOWABLE)
    ]
    assert not hits, "cite docs/internals.md#<anchor> or upstream instead:\n" + "\n".join(hits)


def test_every_cited_internals_anchor_exists() -> None:
    """Code, tests, pages and examples cite ``docs/internals.md#<anchor>``: each names a
    heading of the page (sections may move; an anchor, once cited, may not be renamed)."""
    page = INTERNALS.read_text()
    headings = ANCHOR.findall(page)
    assert len(headings) == len(set(headings)), f"an anchor is given twice: {sorted(headings)}"
    cited = [
        (f"{path}:{number}", anchor)
        for path, text in tracked_text_files()
        for number, line in enumerate(text.splitlines(), start=1)
        for anchor in CITED_ANCHOR.findall(line)
    ]
    assert cited, "nothing cites docs/internals.md"
    # The page's own links to its sections, ``[...](#anchor)``.
    cited += [("docs/internals.md", anchor) for anchor in SECTION_LINK.findall(page)]
    missing = [f"{where}: #{anchor}" for where, anchor in cited if anchor not in headings]
    assert not missing, "no such anchor in docs/internals.md:\n" + "\n".join(missing)
