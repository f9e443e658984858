"""How a greenlet waits for the loop thread, in a monkey-patched subprocess (patching a
process cannot be undone, so never in the test process itself)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

GEVENT_CALLS = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import asyncio
    import contextvars
    import json

    import gevent

    from async_session_task._runtime import get_runtime

    async def body():
        await asyncio.sleep(0)

    runtime, loop = get_runtime(), gevent.get_hub().loop
    before = loop.activecnt
    for _ in range(50):
        runtime.run(body())
    print(json.dumps({"before": before, "after": loop.activecnt}))
    """
)


def test_gevent_waiter_closes_its_watcher_when_the_call_returns() -> None:
    """Each call's hub watcher is closed by the waiting greenlet as the call returns, not
    left active on the hub until a garbage collection, in whatever thread that runs."""
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_CALLS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.splitlines()[-1])
    assert counts["after"] == counts["before"], counts
