"""The benchmark behind ``docs/performance.md``: ``python -m benchmarks --help``.

Each implementation of the same task runs in a real ``celery worker`` (Redis broker,
PostgreSQL): this library, the sync pattern, the naive ``asyncio.run`` pattern and a no-op
task. See ``benchmarks/__main__.py`` for what is measured and how.
"""
