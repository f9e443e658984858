"""Engine options for production: a direct connection, and PgBouncer in transaction mode."""

from __future__ import annotations

from typing import Any

from async_session_task import pgbouncer_engine_options

#: Straight to PostgreSQL: one connection per prefork child (a second one for nested eager
#: calls). ``statement_timeout`` below the task's time limit: a statement still running when
#: the worker gives up on it is stopped by the server too. (``pool_pre_ping`` is on already.)
DIRECT: dict[str, Any] = {
    "pool_size": 1,
    "max_overflow": 1,
    "connect_args": {"server_settings": {"statement_timeout": "25000"}},  # ms
}

#: Through PgBouncer in transaction mode: no prepared-statement cache, unnamed prepared
#: statements, a QueuePool with pre-ping. Your own options merge in: here, connect within 10 s.
#: (PgBouncer refuses most startup parameters: set statement_timeout on the role instead,
#: ``ALTER ROLE app SET statement_timeout = '25s'``.)
PGBOUNCER: dict[str, Any] = pgbouncer_engine_options(connect_args={"timeout": 10})

# app.conf.async_session_engine_options = PGBOUNCER
# app.conf.task_soft_time_limit = 30
