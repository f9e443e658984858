"""``python -m async_session_task check -A proj``: the commands without the ``celery`` program."""

from ._cli import async_session

if __name__ == "__main__":
    async_session(prog_name="python -m async_session_task")
