"""Waiting for results of the Redis result backend: one subscriber per process and server.

Celery's Redis backend stores each result under its key and publishes it on a channel of the
same name. One thread per process and Redis server (:class:`Subscriber`) holds one pub/sub
connection for every waiter of the process: a channel is subscribed while someone waits on
it. Once Redis confirms a subscription, the thread reads the stored results of the channels
just subscribed (one ``MGET`` for all of them): a result stored before the subscription is
read there, one stored after is announced on the channel. Either way the thread decodes it
and resolves the waiters' futures on their loops, so a waiter neither reads the store nor
polls while the subscriber works. The thread sleeps on its connection and on a wake-up
socket: no polling, no CPU while results are awaited, and a new waiter is subscribed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import select
import socket
import threading
import time
from collections import defaultdict
from typing import Any

from celery import states

from ._process import ThreadsByKey
from ._waiters import settle

#: Seconds the thread sleeps when it cannot watch its connection (not connected).
LISTEN = 0.05


class Waiter:
    """One ``aget()``: its loop, the future resolved with the result's meta once it is
    ready, and the backend that decodes it (the waiter's own: its app's serializer)."""

    __slots__ = ("backend", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: Any) -> None:
        self.loop = loop
        self.backend = backend
        self.future: asyncio.Future[dict[str, Any]] = loop.create_future()


class Subscriber(threading.Thread):
    def __init__(self, client: Any) -> None:
        super().__init__(name="async_session_task-results", daemon=True)
        self._client = client
        # Subscribe confirmations too: they say when to read what was stored before.
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        #: (un)subscriptions and looks, for the thread, which alone uses the pubsub object.
        self._commands: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        self._woken.setblocking(False)
        self._lock = threading.Lock()
        self._waiters: dict[bytes, set[Waiter]] = defaultdict(set)
        #: Channels whose stored result to read (the thread's only).
        self._looks: set[bytes] = set()

    def wait_on(self, channel: bytes, loop: asyncio.AbstractEventLoop, backend: Any) -> Waiter:
        waiter = Waiter(loop, backend)
        with self._lock:
            first = not self._waiters[channel]
            self._waiters[channel].add(waiter)
        # Subscribed already: its result may have come before this waiter did.
        self._command("subscribe" if first else "look", channel)
        return waiter

    def done(self, channel: bytes, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(channel)
            if waiters is None:
                return
            waiters.discard(waiter)
            if waiters:
                return
            del self._waiters[channel]
        self._command("unsubscribe", channel)

    def _command(self, name: str, channel: bytes) -> None:
        self._commands.put((name, channel))
        with contextlib.suppress(OSError):  # full: the thread is due to wake anyway
            self._wake.send(b"\0")

    def run(self) -> None:
        while True:
            try:
                self._take()
                self._deliver()
                if self._looks:
                    self._look()
                self._sleep()
            except Exception:  # a broken connection: redis-py reconnects and resubscribes
                # (meanwhile each waiter looks at the store itself, with backoff)
                time.sleep(0.5)

    def _take(self) -> None:
        while True:
            try:
                name, channel = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "look":
                self._looks.add(channel)
            else:
                getattr(self._pubsub, name)(channel)

    def _deliver(self) -> None:
        """Take every message received so far, without waiting for more."""
        while self._pubsub.subscribed:
            message = self._pubsub.get_message(timeout=0)
            if message is None:
                return
            kind = message.get("type")
            if kind == "subscribe":
                self._looks.add(message["channel"])
            elif kind == "message":
                self._announce(message["channel"], message["data"])

    def _look(self) -> None:
        """Read the stored results of the channels in :attr:`_looks`, in one round trip."""
        channels = list(self._looks)
        stored = self._client.mget(channels)
        self._looks.clear()
        for channel, payload in zip(channels, stored, strict=True):
            if payload is not None:
                self._announce(channel, payload)

    def _announce(self, channel: bytes, payload: Any) -> None:
        with self._lock:
            waiters = list(self._waiters.get(channel, ()))
        for waiter in waiters:
            try:
                meta = waiter.backend.decode_result(payload)
            except Exception:  # not for this waiter's serializer: it looks itself
                continue
            if meta.get("status") in states.READY_STATES:
                with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
                    waiter.loop.call_soon_threadsafe(settle, waiter.future, meta, None)

    def _sleep(self) -> None:
        """Until Redis sends something (while subscribed) or a command comes."""
        readable: list[Any] = [self._woken]
        timeout: float | None = None
        if self._pubsub.subscribed:
            sock = getattr(self._pubsub.connection, "_sock", None)  # redis-py's Connection
            if sock is None:  # not connected: look again soon
                timeout = LISTEN
            elif getattr(sock, "pending", lambda: 0)():  # TLS: read, not yet taken
                return
            else:
                readable.append(sock)
        select.select(readable, [], [], timeout)
        with contextlib.suppress(OSError):
            self._woken.recv(4096)


_subscribers = ThreadsByKey[Subscriber]()


def subscriber(backend: Any) -> Subscriber | None:
    """The subscriber of this process for ``backend`` if it is Redis's; None otherwise."""
    client = getattr(backend, "client", None)
    if type(backend).__name__ not in ("RedisBackend", "SentinelBackend") or client is None:
        return None
    # One per Redis server: each thread that sends has a backend object of its own
    # (celery/celery#6416), and the results of all of them are published on the same server.
    return _subscribers.get(
        getattr(backend, "url", None) or id(backend), lambda: Subscriber(client)
    )
