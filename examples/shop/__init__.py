"""A FastAPI-style shop whose Celery tasks reuse its ``async_sessionmaker`` and repository.

* ``db.py``: the engine, ``SessionLocal`` and the ``get_session`` dependency, as the web app
  has them.
* ``models.py`` and ``repository.py``: the ORM layer, functions that take a session.
* ``api.py``: request handlers (plain functions here; in FastAPI, routes with
  ``Depends(get_session)``).
* ``tasks.py``: the Celery app; ``async_session_maker`` names the web app's ``SessionLocal``.

Run a worker, then play the web server::

    celery -A examples.shop.tasks worker -P threads
    python3 -m examples.shop
"""
