"""The in-engine guard's event stream: per-step scores and triggers as NDJSON over TCP.

The engine side (:class:`EventPublisher`) accepts any number of subscribers and never
blocks a decoding step: each subscriber has a bounded queue, and lines that do not fit
are dropped (and counted). The stream carries request keys, token indices and scores,
never text.

Authentication. With a shared secret (``TRAJGUARD_EVENTS_SECRET`` on both ends, at least
16 characters) every connection starts with a mutual HMAC-SHA256 challenge-response:

1. subscriber -> ``{"nonce": Ns}`` (32 random bytes, hex);
2. publisher -> ``{"hello": {...}, "nonce": Np, "mac": HMAC(secret, "publisher" | Ns | Np | hello)}``;
3. subscriber -> ``{"mac": HMAC(secret, "subscriber" | Np | Ns)}``; only then do events flow.

Each side compares with :func:`hmac.compare_digest` and hangs up on a mismatch, so a
stranger answering on the port (even one that knows the public probe's digest) is
refused, and a recorded greeting cannot be replayed. Without a secret the publisher
sends its hello at once (no ``mac``) and both ends accept that only on loopback
(:func:`events_key`); a subscriber with a secret refuses such a stream. The lines after
the handshake are neither encrypted nor signed: across an untrusted network, tunnel them.

Lines (one JSON object each):

- ``{"hello": {...}}`` first, after the handshake: probe hook, threshold, digest, model,
  version (with ``nonce`` and ``mac`` when authenticated).
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
import hmac
import ipaddress
import json
import logging
import queue
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from guard.errors import ConfigError

logger = logging.getLogger(__name__)

_MAX_LINE = 1 << 24
_MAX_HANDSHAKE_LINE = 1 << 16
_NONCE_BYTES = 32
#: Shortest accepted secret (characters).
MIN_SECRET_LENGTH = 16
#: Seconds a publisher waits for each handshake line of a new subscriber.
HANDSHAKE_TIMEOUT_S = 5.0
_PUBLISHER_TAG = b"trajguard-events/v1/publisher"
_SUBSCRIBER_TAG = b"trajguard-events/v1/subscriber"


class EventStreamAuthError(ValueError):
    """The other end failed the handshake: a stranger, another secret, or no secret."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secret_key(secret: str) -> bytes:
    """The HMAC key of a shared secret.

    Raises:
        ConfigError: shorter than :data:`MIN_SECRET_LENGTH` characters.
    """
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"TRAJGUARD_EVENTS_SECRET must have at least {MIN_SECRET_LENGTH} characters"
        )
    return secret.encode()


def events_key(host: str, secret: str | None) -> bytes | None:
    """The HMAC key of ``secret`` for a stream at ``host`` (``None``: unauthenticated).

    The one rule for both ends: without a secret, the stream may only use loopback.

    Raises:
        ConfigError: a secret shorter than :data:`MIN_SECRET_LENGTH`, or no secret for a
            host other than loopback.
    """
    if secret:
        return secret_key(secret)
    if not is_loopback(host):
        raise ConfigError(
            f"the guard event stream on {host!r} is not loopback: set TRAJGUARD_EVENTS_SECRET "
            "(the same value on vLLM and the proxy) to authenticate it"
        )
    return None


def _mac(key: bytes, tag: bytes, *parts: bytes) -> str:
    return hmac.new(key, tag + b"".join(parts), hashlib.sha256).hexdigest()


def _same_mac(expected: str, got: Any) -> bool:
    """Constant-time comparison of a MAC with whatever the peer sent."""
    return hmac.compare_digest(expected.encode(), str(got).encode())


def _parse(raw: bytes) -> Any:
    """One JSON line from the peer.

    Raises:
        ValueError: not JSON (nesting too deep included).
    """
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("malformed line: nested too deeply") from exc


def _canonical(hello: dict[str, Any]) -> bytes:
    return json.dumps(hello, sort_keys=True, separators=(",", ":")).encode()


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def _nonce(message: Any) -> bytes:
    """The nonce of a handshake line.

    Raises:
        EventStreamAuthError: no well-formed nonce.
    """
    try:
        nonce = bytes.fromhex(message["nonce"])
    except (TypeError, KeyError, ValueError) as exc:
        raise EventStreamAuthError("malformed handshake: no nonce") from exc
    if len(nonce) != _NONCE_BYTES:
        raise EventStreamAuthError("malformed handshake: bad nonce length")
    return nonce


def _challenge() -> tuple[bytes, bytes]:
    """A subscriber's fresh nonce and the line that sends it."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce, _line({"nonce": nonce.hex()})


def _accept_greeting(
    first: Any, nonce: bytes, key: bytes | None
) -> tuple[dict[str, Any], bytes | None]:
    """Check the publisher's first line; its hello and the line proving our key (if any).

    Raises:
        EventStreamAuthError: the publisher is not authenticated the way we are, or its
            MAC does not match (another secret, a stranger, a replayed greeting).
        ValueError: not a trajguard event stream.
    """
    if not isinstance(first, dict) or not isinstance(first.get("hello"), dict):
        raise ValueError("not a trajguard event stream")
    hello = first["hello"]
    if key is None:
        if "mac" in first:
            raise EventStreamAuthError(
                "the event stream requires a secret: set TRAJGUARD_EVENTS_SECRET"
            )
        return hello, None
    if "mac" not in first:
        raise EventStreamAuthError("refused an unauthenticated event stream (no secret there)")
    theirs = _nonce(first)
    expected = _mac(key, _PUBLISHER_TAG, nonce, theirs, _canonical(hello))
    if not _same_mac(expected, first["mac"]):
        raise EventStreamAuthError("the event stream failed authentication (wrong secret)")
    return hello, _line({"mac": _mac(key, _SUBSCRIBER_TAG, theirs, nonce)})


def probe_digest(coef: np.ndarray, intercept: float) -> str:
    """Short digest of a probe's weights (both ends check they use the same probe)."""
    data = np.asarray(coef, dtype=np.float64).tobytes() + np.float64(intercept).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class _Connection:
    """One subscriber: the handshake, then a bounded line queue, both in its own thread."""

    def __init__(
        self, sock: socket.socket, handshake: Callable[[socket.socket], None], max_queue: int
    ) -> None:
        self.sock = sock
        self.lines: queue.Queue[bytes | None] = queue.Queue(max_queue)
        self.dropped = 0
        self.alive = True
        self._handshake = handshake
        threading.Thread(target=self._run, name="trajguard-events", daemon=True).start()

    def offer(self, line: bytes) -> None:
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        try:
            self._handshake(self.sock)
            while (line := self.lines.get()) is not None:
                self.sock.sendall(line)
        except TimeoutError:  # only the handshake has a timeout
            logger.warning("trajguard: refused an event subscriber: no handshake in time")
        except OSError:
            pass  # the subscriber went away
        except Exception as exc:  # noqa: BLE001 - a bad peer must not kill the engine's thread
            logger.warning("trajguard: refused an event subscriber: %s", exc)
        finally:
            self.alive = False
            _discard_input(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self.lines.put_nowait(None)


def _discard_input(sock: socket.socket) -> None:
    """Read what the peer sent and nobody read (closing over unread input sends a reset,
    which can destroy the last lines in flight)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        while sock.recv(4096):
            pass


def _read_line(reader: Any) -> Any:
    """One JSON handshake line from a socket file (raises on EOF or garbage)."""
    raw = reader.readline(_MAX_HANDSHAKE_LINE)
    if not raw:
        raise ConnectionError("the peer closed during the handshake")
    return _parse(raw)


class EventPublisher:
    """TCP server that fans guard events out to subscribers (engine side).

    Args:
        host: interface to bind (loopback unless subscribers are remote).
        port: port to bind (0: any free port, see :attr:`address`).
        hello: first line every subscriber receives.
        secret: shared secret of the handshake (``None``: unauthenticated, loopback only).
        max_queue: lines buffered per subscriber before new ones are dropped.
        handshake_timeout: seconds a subscriber has for each handshake line.

    Raises:
        ConfigError: no secret for a host other than loopback, or too short a secret.
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        hello: dict[str, Any],
        secret: str | None = None,
        max_queue: int = 4096,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ):
        self._key = events_key(host, secret)
        self._server = socket.create_server((host, port))
        self._address: tuple[str, int] = self._server.getsockname()[:2]
        self._hello = hello
        self._max_queue = max_queue
        self._handshake_timeout = handshake_timeout
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="trajguard-events-accept", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        return self._address

    @property
    def authenticated(self) -> bool:
        """Whether subscribers must prove the shared secret."""
        return self._key is not None

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
                connection = _Connection(sock, self._handshake, self._max_queue)
                self._connections.append(connection)

    def _handshake(self, sock: socket.socket) -> None:
        """Greet one subscriber (see the module docstring); raises if it fails."""
        if self._key is None:
            sock.sendall(_line({"hello": self._hello}))
            return
        sock.settimeout(self._handshake_timeout)
        with sock.makefile("rb") as reader:
            theirs = _nonce(_read_line(reader))
            ours = secrets.token_bytes(_NONCE_BYTES)
            mac = _mac(self._key, _PUBLISHER_TAG, theirs, ours, _canonical(self._hello))
            sock.sendall(_line({"hello": self._hello, "nonce": ours.hex(), "mac": mac}))
            proof = _read_line(reader)
        expected = _mac(self._key, _SUBSCRIBER_TAG, ours, theirs)
        if not isinstance(proof, dict) or not _same_mac(expected, proof.get("mac")):
            raise EventStreamAuthError("the subscriber failed authentication (wrong secret)")
        sock.settimeout(None)

    def publish(self, message: dict[str, Any]) -> None:
        """Queue one line for every live subscriber (never blocks)."""
        connections = self._connections
        if not connections:
            return
        line = _line(message)
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


def read_hello(
    host: str, port: int, *, secret: str | None = None, timeout: float = 2.0
) -> dict[str, Any] | None:
    """The hello of a publisher at ``host:port`` that passes the handshake, else ``None``.

    Args:
        secret: the shared secret (``None``: accept only an unauthenticated loopback stream).

    Raises:
        ConfigError: no secret for a host other than loopback, or too short a secret.
    """
    key = events_key(host, secret)
    nonce, challenge = _challenge()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(challenge)
            with sock.makefile("rb") as reader:
                hello, proof = _accept_greeting(_read_line(reader), nonce, key)
            if proof is not None:
                sock.sendall(proof)
    except EventStreamAuthError as exc:
        logger.error("trajguard event stream at %s:%d refused: %s", host, port, exc)
        return None
    except (OSError, ValueError):
        return None
    return hello


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

    Args:
        secret: the shared secret (``None``: accept only an unauthenticated loopback stream).
    """

    def __init__(self, *, secret: str | None = None) -> None:
        self.hello: dict[str, Any] | None = None
        self._secret = secret
        self._feeds: dict[str, ScoreFeed] = {}
        self._reader_task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.error: BaseException | None = None

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    async def connect(self, host: str, port: int, *, timeout: float = 5.0) -> dict[str, Any]:
        """Connect, run the handshake and return the publisher's hello.

        Raises:
            ConfigError: no secret for a host other than loopback, or too short a secret.
            EventStreamAuthError: the publisher failed the handshake (a stranger).
            OSError, TimeoutError, ValueError: no publisher there.
        """
        key = events_key(host, self._secret)
        nonce, challenge = _challenge()
        try:
            async with asyncio.timeout(timeout):
                reader, self._writer = await asyncio.open_connection(host, port, limit=_MAX_LINE)
                self._writer.write(challenge)
                await self._writer.drain()
                first = await reader.readline()
                if not first:
                    raise ConnectionError("the publisher closed during the handshake")
                hello, proof = _accept_greeting(_parse(first), nonce, key)
                if proof is not None:
                    self._writer.write(proof)
                    await self._writer.drain()
        except BaseException:
            await self.close()
            raise
        self.hello = hello
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
            self._writer = None
