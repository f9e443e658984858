"""``pydantic=True`` on an async body: the returned model is dumped as for a sync task.

Celery's ``pydantic_wrapper`` (``celery/app/base.py``, Celery 5.5+) validates the arguments,
calls the function and dumps a returned model; on an ``async def`` function it sees the
coroutine, never the model (docs/internals.md#pydantic-result). The arguments are still
validated by Celery; this module finishes its work on the awaited result, with the wrapper's
own dump options (``pydantic_dump_kwargs``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any


def _identity(value: Any) -> Any:
    return value


def result_dumper(run: Callable[..., Any]) -> Callable[[Any], Any]:
    """What turns the awaited result of ``run`` into what a sync task would return.

    The identity unless ``run`` is Celery's pydantic wrapper around an async function.
    """
    wrapped = getattr(run, "__wrapped__", None)
    code = getattr(run, "__code__", None)
    if wrapped is None or code is None or "dump_kwargs" not in code.co_freevars:
        return _identity
    # The wrapper's closure holds its options (docs/internals.md#pydantic-result).
    nonlocals = inspect.getclosurevars(run).nonlocals
    dump_kwargs: dict[str, Any] = nonlocals.get("dump_kwargs") or {"mode": "json"}
    base_model: Any = nonlocals.get("BaseModel")
    if base_model is None:
        return _identity
    try:
        annotation: Any = typing.get_type_hints(wrapped).get("return")
    except (NameError, AttributeError, TypeError):
        annotation = inspect.signature(wrapped).return_annotation
    # ``Model | None`` dumps a Model, as Celery's ``get_optional_arg`` does.
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(args) == 1 and len(typing.get_args(annotation)) == 2:
        annotation = args[0]
    if not isinstance(annotation, type):
        return _identity
    model_class: Any = annotation

    def dump(value: Any) -> Any:
        if isinstance(value, base_model) and isinstance(value, model_class):
            dumped: Any = value.model_dump(**dump_kwargs)
            return dumped
        return value

    return dump
