"""The typed face of ``AsyncSessionTask``: the body's parameters ``P`` and return type ``R``.

Declarations for type checkers only (docs/typed-tasks.md): at runtime ``TypedTask`` is an
empty ``Generic``, so ``AsyncSessionTask[[int], None]`` is valid in an annotation and Celery's
``type(name, (base,), attrs)`` builds task classes as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic

# Defaults (PEP 696): a bare ``AsyncSessionTask`` is ``AsyncSessionTask[..., Any]``, as before.
from typing_extensions import ParamSpec, TypeVar

if TYPE_CHECKING:
    from celery.canvas import Signature
    from celery.result import AsyncResult

P = ParamSpec("P", default=...)
R = TypeVar("R", default=Any)


class TypedTask(Generic[P, R]):
    """What a call of a task checks: the body's arguments, and a direct call's result."""

    if TYPE_CHECKING:

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

        def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]: ...

        def apply_async(
            self,
            args: tuple[Any, ...] | list[Any] | None = None,
            kwargs: dict[str, Any] | None = None,
            **options: Any,
        ) -> AsyncResult[R]: ...

        def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature: ...

        # A partial: the arguments may come from the previous task of a chain.
        def s(self, *args: Any, **kwargs: Any) -> Signature: ...
