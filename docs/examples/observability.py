"""OpenTelemetry for a worker of AsyncSessionTask tasks: a span per run, SQL spans under it.

Call ``setup_tracing`` where the worker's app is defined (at import, before the pool starts).
The Celery instrumentation traces each run; ``engine_created`` attaches the SQLAlchemy
instrumentation to each engine the library makes, in the process that makes it.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine

from async_session_task.signals import engine_created


def setup_tracing(processor: SpanProcessor) -> TracerProvider:
    """Trace runs and their SQL; spans go to ``processor`` (e.g. a BatchSpanProcessor)."""
    provider = TracerProvider()
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]

    @engine_created.connect(weak=False)
    def instrument_engine(engine: AsyncEngine, **_: Any) -> None:
        # The SQL of a run is executed on the loop, in a copy of the run's context: its
        # spans are children of the run's span. skip_dep_check: the instrumentation
        # declares sqlalchemy < 2.1 and works with 2.1.
        SQLAlchemyInstrumentor().instrument(
            engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True
        )

    return provider
