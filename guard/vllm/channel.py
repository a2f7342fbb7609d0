"""The in-engine guard's event stream: per-step scores and triggers as NDJSON over TCP.

The engine side (:class:`EventPublisher`) accepts any number of subscribers and never
blocks a decoding step: each subscriber has a bounded queue, and lines that do not fit
are dropped (and counted). The stream carries request keys, token indices and scores,
never text.

Lines (one JSON object each):

- ``{"hello": {...}}`` first, on connect: probe hook, threshold, digest, model, version.
- ``{"ev": [{"id", "i", "s", "l", "f", "a"}, ...]}`` once per step with guarded rows:
  request key, output token index (``-1``: last prompt token), score, debounced level
  (``null`` for forced recovery tokens), flagged, action (``stop``/``rollback``/``null``).
- ``{"end": [key, ...]}`` when requests leave the batch.

:class:`EventSubscriber` is the asyncio client the proxy uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import queue
import socket
import threading
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_MAX_LINE = 1 << 24


def probe_digest(coef: np.ndarray, intercept: float) -> str:
    """Short digest of a probe's weights (both ends check they use the same probe)."""
    data = np.asarray(coef, dtype=np.float64).tobytes() + np.float64(intercept).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class _Connection:
    """One subscriber: a bounded line queue drained by its own thread."""

    def __init__(self, sock: socket.socket, hello: bytes, max_queue: int) -> None:
        self.sock = sock
        self.lines: queue.Queue[bytes | None] = queue.Queue(max_queue)
        self.lines.put_nowait(hello)
        self.dropped = 0
        self.alive = True
        threading.Thread(target=self._drain, name="trajguard-events", daemon=True).start()

    def offer(self, line: bytes) -> None:
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        try:
            while (line := self.lines.get()) is not None:
                self.sock.sendall(line)
        except OSError:
            pass
        finally:
            self.alive = False
            with contextlib.suppress(OSError):
                self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self.lines.put_nowait(None)


class EventPublisher:
    """TCP server that fans guard events out to subscribers (engine side).

    Args:
        host: interface to bind (loopback unless subscribers are remote).
        port: port to bind (0: any free port, see :attr:`address`).
        hello: first line every subscriber receives.
        max_queue: lines buffered per subscriber before new ones are dropped.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, host: str, port: int, *, hello: dict[str, Any], max_queue: int = 4096):
        self._server = socket.create_server((host, port))
        self._address: tuple[str, int] = self._server.getsockname()[:2]
        self._hello = (json.dumps({"hello": hello}) + "\n").encode()
        self._max_queue = max_queue
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="trajguard-events-accept", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        return self._address

    @property
    def has_subscribers(self) -> bool:
        """Whether anyone listens (publishing is skipped otherwise)."""
        return bool(self._connections)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            if self._closed:
                sock.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections = [c for c in self._connections if c.alive]
                self._connections.append(_Connection(sock, self._hello, self._max_queue))

    def publish(self, message: dict[str, Any]) -> None:
        """Queue one line for every live subscriber (never blocks)."""
        connections = self._connections
        if not connections:
            return
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        for connection in connections:
            if connection.alive:
                connection.offer(line)

    def close(self) -> None:
        """Stop accepting and disconnect everyone."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections = []


def read_hello(host: str, port: int, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """The hello of a publisher at ``host:port``, or ``None`` when there is none."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            first = json.loads(sock.makefile("rb").readline(_MAX_LINE))
    except (OSError, ValueError):
        return None
    return first.get("hello") if isinstance(first, dict) else None


class ScoreFeed:
    """Events of one request key, by output token index, as they arrive."""

    def __init__(self) -> None:
        self._events: dict[int, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self._error: BaseException | None = None

    def put(self, event: dict[str, Any]) -> None:
        self._events[int(event["i"])] = event
        self._changed.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._changed.set()

    async def get(self, index: int, *, timeout: float) -> dict[str, Any]:
        """The event of output token ``index``, waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: it did not come in time.
            ConnectionError: the stream broke.
        """
        async with asyncio.timeout(timeout):
            while index not in self._events:
                if self._error is not None:
                    raise ConnectionError(f"guard event stream lost: {self._error}")
                self._changed.clear()
                await self._changed.wait()
        return self._events.pop(index)


class EventSubscriber:
    """asyncio client of an :class:`EventPublisher` (proxy side).

    Use :meth:`connect`, then :meth:`watch` a key *before* sending its request.
    """

    def __init__(self) -> None:
        self.hello: dict[str, Any] | None = None
        self._feeds: dict[str, ScoreFeed] = {}
        self._reader_task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.error: BaseException | None = None

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    async def connect(self, host: str, port: int, *, timeout: float = 5.0) -> dict[str, Any]:
        """Connect and return the publisher's hello.

        Raises:
            OSError, TimeoutError, ValueError: no publisher there.
        """
        async with asyncio.timeout(timeout):
            reader, self._writer = await asyncio.open_connection(host, port, limit=_MAX_LINE)
            first = json.loads(await reader.readline())
        if "hello" not in first:
            raise ValueError("not a trajguard event stream")
        self.hello = first["hello"]
        self.error = None
        self._reader_task = asyncio.create_task(self._read(reader))
        return self.hello

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                for event in message.get("ev", ()):
                    feed = self._feeds.get(event["id"])
                    if feed is not None:
                        feed.put(event)
            raise ConnectionError("publisher closed the stream")
        except (OSError, ValueError) as exc:
            self.error = exc
            logger.error("trajguard event stream lost: %s", exc)
            for feed in self._feeds.values():
                feed.fail(exc)

    def watch(self, key: str) -> ScoreFeed:
        """Start collecting the events of ``key``."""
        feed = ScoreFeed()
        if self.error is not None:
            feed.fail(self.error)
        self._feeds[key] = feed
        return feed

    def unwatch(self, key: str) -> None:
        self._feeds.pop(key, None)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
