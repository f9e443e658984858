"""Signals of this package, in the style of ``celery.signals``.

``engine_created``
    Sent each time the package creates an ``AsyncEngine`` in a process (from
    ``async_session_url``, at the first run of a task that uses it in that process), before any
    session uses it. Arguments: ``sender`` (the task whose run made it) and ``engine`` (the
    ``AsyncEngine``). Connect to it to attach instrumentation to engines made lazily in each
    worker process::

        @engine_created.connect
        def instrument(engine, **kwargs):
            SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)

    Engines of your own ``async_session_maker`` are yours: instrument them where you make them.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["engine_created"]

engine_created = Signal(name="engine_created", providing_args={"engine"})
