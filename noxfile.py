"""Development tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
PYRIGHT = "pyright@1.1.390"


def install_test(session: nox.Session, *constraints: str) -> None:
    session.install("-e", ".[sqlite,gevent,eventlet,test]", *constraints)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite; service tests skip without PostgreSQL and Redis unless required."""
    install_test(session)
    session.run("pytest", "-n", "2", *session.posargs)


# The oldest releases the package supports; ``tests`` runs the newest.
MINIMUM = ("celery[redis]==5.5.0", "sqlalchemy[asyncio]==2.0.42", "anyio==4.12.0")


@nox.session(python=PYTHON, name="tests-min")
def tests_min(session: nox.Session) -> None:
    """The core, pool, exactly-once, outbox and calling tests on the minimum supported
    Celery and SQLAlchemy."""
    install_test(session, *MINIMUM)
    session.run("pytest", "-n", "2", "tests/test_eager.py", "tests/test_worker.py",
                "tests/test_pools.py", "tests/test_once.py", "tests/test_outbox.py",
                "tests/test_calling.py", *session.posargs)  # fmt: skip


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """Fault injection on real workers: private PostgreSQL and Redis restarted, workers killed."""
    install_test(session)
    session.run("pytest", "-n", "2", "tests/faults", *session.posargs)


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """On demand: 10,000 mixed runs per pool; figures in build/soak/ (docs/soak.md)."""
    install_test(session)
    session.run("pytest", "-s", "tests/soak", *session.posargs, env={"AST_SOAK": "1"})


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors; ``-- serve`` to preview it."""
    session.install("-e", ".[docs]")
    command = session.posargs or ["build", "--strict"]
    session.run("mkdocs", *command, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the tests."""
    install_test(session)
    session.install(".[typecheck]")
    session.run("mypy")


@nox.session(python=PYTHON)
@nox.parametrize("celery_types", ["none", "0.26.0"])
def typing(session: nox.Session, celery_types: str) -> None:
    """tests/typing/ under mypy --strict and pyright strict, with and without celery-types;
    an unused ignore fails, so each wrong call must stay an error on its line."""
    session.install("-e", ".[typecheck]", "pydantic")
    files = ["tests/typing/calls.py"]
    if celery_types != "none":
        session.install(f"celery-types=={celery_types}")
        # There AsyncResult is generic: sending a task returns AsyncResult[R].
        files.append("tests/typing/with_celery_types.py")
    session.run("mypy", "--strict", *files)
    python = f"{session.virtualenv.location}/bin/python"
    project = "tests/typing/pyrightconfig.json"
    session.run(
        "npx", "--yes", PYRIGHT, "-p", project, "--pythonpath", python, *files, external=True
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark (docs/performance.md); needs PostgreSQL and Redis.

    Options go after ``--``, e.g. ``nox -s bench -- --rounds 3 --tasks 300`` (``--help``).
    """
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
