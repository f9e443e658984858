"""kombu's filesystem transport, with messages that appear whole.

kombu writes a message file in place: the reader can list, move and read it between the
writer's ``open`` and its ``write``, get an empty file and end the worker with a
``JSONDecodeError`` (celery/kombu#1551; the writer's ``flock`` does not stop a reader that
never locks). Here a message is written under a name the reader skips and renamed when
complete; a rename within a folder is atomic.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    # kombu's two bases name the second argument differently (message, payload).
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # The name as kombu makes it, so the order in which readers take messages is kept.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        # ".part" ends the name, so the reader's "<queue>.msg" filter passes over it.
        partial = f"{path}.part"
        with open(partial, "wb") as file:
            file.write(dumps(payload).encode())  # type: ignore[no-untyped-call]
        os.replace(partial, path)


class Transport(filesystem.Transport):
    Channel = Channel
