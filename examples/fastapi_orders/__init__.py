"""A FastAPI app whose POST handler queues a Celery task with ``on_commit``.

* ``db.py``: the engine, ``SessionLocal`` and the ``get_session`` dependency.
* ``models.py``: the ``Order`` model.
* ``tasks.py``: the Celery app; ``async_session_maker`` names the web app's ``SessionLocal``.
* ``web.py``: the FastAPI app. ``POST /orders`` records an order and queues
  ``process_order`` for it with ``on_commit``: the message leaves once the order is
  committed, so the worker always finds it.

Run a worker and the web server, then post an order::

    celery -A examples.fastapi_orders.tasks worker -P threads
    uvicorn examples.fastapi_orders.web:app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' -d '{"item": "mug"}'
"""
