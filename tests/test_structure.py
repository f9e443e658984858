"""The package's shape: its imports run one way, with nothing hidden inside a function."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "async_session_task"


def _package_imports(tree: ast.Module, *, top_level: bool) -> set[str]:
    """Modules of the package that ``tree`` imports (at module level, or inside functions)."""
    nodes = (
        tree.body
        if top_level
        else [
            node
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
        ]
    )
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module)
            elif node.level == 1:  # from . import _x
                found.update(alias.name for alias in node.names)
            elif (node.module or "").startswith("async_session_task."):
                found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("async_session_task.")
            )
    return found


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def test_the_import_graph_has_no_cycle() -> None:
    graph = {
        name: _package_imports(tree, top_level=True) - {name}
        for name, tree in _modules().items()
        if name != "__init__"
    }
    graph = {name: {d for d in deps if d in graph} for name, deps in graph.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError
    # Along the imports: settings, session factories, the task class, the worker's signals.
    assert order.index("_config") < order.index("_factory") < order.index("_task")
    assert order.index("_run") < order.index("_task") < order.index("_worker")


def test_no_package_import_inside_a_function() -> None:
    """An import inside a function is how a circle hides; none is needed."""
    hidden = {
        name: imports
        for name, tree in _modules().items()
        if (imports := _package_imports(tree, top_level=False))
    }
    assert hidden == {}


def test_the_loop_layer_knows_no_runs() -> None:
    """The loop and its watchdog import nothing about runs or sessions, not even through
    another module: what they need of runs is handed to them (``_runtime.hooks``)."""
    modules = _modules()
    # Settings, the process's place in its worker, the time limits, the crossing, the
    # greenlet driver, the waiters, the watchdog.
    loop_layer = {
        "_config", "_pools", "_limits", "_process", "_crossing", "_drive", "_waiters", "_watchdog"
    }  # fmt: skip
    for name in ("_runtime", "_watchdog"):
        seen: set[str] = set()
        todo = [name]
        while todo:
            for imported in _package_imports(modules[todo.pop()], top_level=True) - seen:
                if imported in modules:
                    seen.add(imported)
                    todo.append(imported)
        assert seen <= loop_layer, (name, seen - loop_layer)


def test_settings_and_pool_facts_are_leaves() -> None:
    for name in ("_config", "_pools"):
        assert _package_imports(_modules()[name], top_level=True) == set(), name


def test_only_the_celery_face_connects_signals() -> None:
    connecting = sorted(
        name
        for name, tree in _modules().items()
        if ".connect(" in ast.unparse(tree) and "signals." in ast.unparse(tree)
    )
    assert connecting == ["_worker"]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_attribute(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}


def _upstream_private_uses() -> dict[str, list[str]]:
    """Private names of other projects that the package uses, each with where: attributes
    read (``x._name``, ``getattr(x, "_name", ...)``) or written on objects not its own, and
    imports (``from celery._state import _task_stack``). A private name the package defines
    (a function, class or variable, or an attribute of ``self``) is taken for its own, so an
    upstream attribute that a package class also defines goes unseen here."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    own = {path.stem for path in trees}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and _own_attribute(node)
            ):
                own.add(node.attr)
    uses: dict[str, list[str]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Attribute) and not (
                isinstance(node.ctx, ast.Store) and _own_attribute(node)
            ):
                names = [node.attr]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "hasattr", "setattr"}
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                names = [node.args[1].value]
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module.partition(".")[0] != PACKAGE.name
            ):
                names = [*node.module.split("."), *(alias.name for alias in node.names)]
            for name in names:
                if _private(name) and name not in own:
                    assert isinstance(node, ast.expr | ast.stmt)  # the three kinds above
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    uses.setdefault(name, []).append(where)
    return uses


def _listed_private_names() -> set[str]:
    """The private parts of the names in docs/internals.md#upstream-private-names."""
    page = (ROOT / "docs" / "internals.md").read_text()
    section = page.partition("{#upstream-private-names}")[2].partition("\n# ")[0]
    names = re.findall(r"^\| `([\w.]+)`", section, re.MULTILINE)
    assert names, "docs/internals.md#upstream-private-names lists no name"
    return {part for name in names for part in name.split(".") if _private(part)}


def test_upstream_private_names_are_listed() -> None:
    """docs/internals.md#upstream-private-names is the checklist of an upgrade: every private
    name of Celery, SQLAlchemy, asyncio or the interpreter the package uses is in it, and
    it lists nothing the package no longer uses."""
    uses = _upstream_private_uses()
    listed = _listed_private_names()
    unlisted = {name: where for name, where in uses.items() if name not in listed}
    assert not unlisted, f"list these in docs/internals.md#upstream-private-names: {unlisted}"
    assert listed <= set(uses), f"listed, no longer used: {sorted(listed - set(uses))}"


def test_tasks_defined_in_functions_are_not_shared() -> None:
    """``@app.task`` defaults to ``shared=True``: Celery then adds the task to every app
    finalized later in the process, so a test that defines one twice (parametrized) makes
    an unrelated later test fail with ``DuplicateTaskNameWarning`` (Celery 5.7)."""
    offenders = []
    root = Path(__file__).parent
    for path in [*root.rglob("*.py"), *(root.parent / "examples").rglob("*.py")]:
        for outer in ast.walk(ast.parse(path.read_text())):
            if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(outer):
                if inner is outer or not isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for decorator in inner.decorator_list:
                    if (
                        isinstance(decorator, ast.Call)
                        and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr == "task"
                        and "shared" not in {keyword.arg for keyword in decorator.keywords}
                    ):
                        offenders.append(f"{path.relative_to(root.parent)}:{decorator.lineno}")
    assert not offenders, f"pass shared=False to tasks defined inside functions: {offenders}"
