"""Engine options for production: a direct connection, and PgBouncer in transaction mode."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

#: Straight to PostgreSQL. ``statement_timeout`` below the task's time limit: a statement
#: still running when the worker gives up on it is stopped by the server too.
DIRECT: dict[str, Any] = {
    "pool_size": 4,
    "max_overflow": 0,
    "pool_pre_ping": True,
    "connect_args": {"server_settings": {"statement_timeout": "25000"}},  # ms
}

#: Through PgBouncer in transaction mode: consecutive transactions of one client may land
#: on different server connections, so no prepared statement may be cached or reused.
#: (PgBouncer refuses most startup parameters: set statement_timeout on the role instead,
#: ``ALTER ROLE app SET statement_timeout = '25s'``.)
PGBOUNCER: dict[str, Any] = {
    "pool_size": 4,
    "max_overflow": 0,
    "connect_args": {
        "statement_cache_size": 0,  # asyncpg's own statement cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's asyncpg adapter cache
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid4()}__",
    },
}

# app.conf.async_session_engine_options = PGBOUNCER
# app.conf.task_soft_time_limit = 30
