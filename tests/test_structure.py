"""The package's shape: its imports run one way, with nothing hidden inside a function."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "async_session_task"


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
    # Settings, the time limits, the crossing, the greenlet driver, the waiters, the watchdog.
    loop_layer = {"_config", "_limits", "_crossing", "_drive", "_waiters", "_watchdog"}
    for name in ("_runtime", "_watchdog"):
        seen: set[str] = set()
        todo = [name]
        while todo:
            for imported in _package_imports(modules[todo.pop()], top_level=True) - seen:
                if imported in modules:
                    seen.add(imported)
                    todo.append(imported)
        assert seen <= loop_layer, (name, seen - loop_layer)


def test_settings_are_a_leaf() -> None:
    assert _package_imports(_modules()["_config"], top_level=True) == set()


def test_only_the_celery_face_connects_signals() -> None:
    connecting = sorted(
        name
        for name, tree in _modules().items()
        if ".connect(" in ast.unparse(tree) and "signals." in ast.unparse(tree)
    )
    assert connecting == ["_worker"]
