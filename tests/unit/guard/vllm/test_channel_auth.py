"""The event stream's handshake: only a publisher that proves the shared secret is trusted."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from guard.errors import ConfigError
from guard.vllm.channel import (
    EventPublisher,
    EventStreamAuthError,
    EventSubscriber,
    read_hello,
)
from guard.vllm.settings import PluginSettings

SECRET = "correct horse battery staple"
OTHER = "another secret, just as long"
HELLO = {"hook_name": "blocks.1.hook_resid_post", "probe_digest": "0123456789abcdef"}


@pytest.fixture
def publish():
    """Start publishers (closed at the end); ``publish(secret)`` returns one."""
    started: list[EventPublisher] = []

    def make(secret: str | None, **kwargs) -> EventPublisher:
        started.append(EventPublisher("127.0.0.1", 0, hello=HELLO, secret=secret, **kwargs))
        return started[-1]

    yield make
    for publisher in started:
        publisher.close()


async def subscribe_and_get(publisher: EventPublisher, secret: str | None) -> dict:
    """Connect with ``secret``, then receive one published event for key ``a``."""
    sub = EventSubscriber(secret=secret)
    try:
        hello = await sub.connect(*publisher.address)
        feed = sub.watch("a")
        while not publisher.has_subscribers:
            await asyncio.sleep(0.01)
        publisher.publish({"ev": [{"id": "a", "i": 0, "s": 0.25}]})
        event = await feed.get(0, timeout=5)
        return {"hello": hello, "event": event}
    finally:
        await sub.close()


def test_same_secret_authenticates_and_events_flow(publish):
    got = asyncio.run(subscribe_and_get(publish(SECRET), SECRET))
    assert got["hello"] == HELLO and got["event"]["s"] == 0.25


@pytest.mark.parametrize(
    ("publisher_secret", "subscriber_secret", "message"),
    [
        (None, SECRET, "unauthenticated"),  # a stranger with the right digest, no secret
        (OTHER, SECRET, "wrong secret"),
        (SECRET, None, "requires a secret"),
    ],
)
def test_subscriber_refuses_a_stream_without_the_same_secret(
    publish, publisher_secret, subscriber_secret, message
):
    publisher = publish(publisher_secret)

    async def go():
        sub = EventSubscriber(secret=subscriber_secret)
        with pytest.raises(EventStreamAuthError, match=message):
            await sub.connect(*publisher.address)
        assert not sub.connected

    asyncio.run(go())
    assert read_hello(*publisher.address, secret=subscriber_secret) is None


def test_read_hello_passes_the_handshake(publish):
    assert read_hello(*publish(SECRET).address, secret=SECRET) == HELLO
    assert read_hello(*publish(None).address) == HELLO


class ReplayingStranger:
    """A fake publisher that answers every subscriber with one recorded greeting line."""

    def __init__(self, greeting: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.greeting = greeting
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with sock, sock.makefile("rb") as reader:
                reader.readline()  # the subscriber's challenge, ignored
                sock.sendall(self.greeting)
                reader.readline()

    def close(self) -> None:
        self.server.close()


def record_greeting(publisher: EventPublisher) -> bytes:
    """A genuine greeting of ``publisher`` (to our own challenge), as a stranger would see it."""
    with socket.create_connection(publisher.address, timeout=5) as sock:
        sock.sendall(json.dumps({"nonce": "00" * 32}).encode() + b"\n")
        return sock.makefile("rb").readline()


def forged_greeting(mac: str) -> bytes:
    return json.dumps({"hello": HELLO, "nonce": "22" * 32, "mac": mac}).encode() + b"\n"


@pytest.mark.parametrize("kind", ["replayed", "forged", "not ascii"])
def test_a_strangers_greeting_is_refused(publish, kind):
    greeting = {
        "replayed": lambda: record_greeting(publish(SECRET)),
        "forged": lambda: forged_greeting("ab" * 32),
        "not ascii": lambda: forged_greeting("\u00e9" * 64),
    }[kind]()
    assert b'"mac"' in greeting
    stranger = ReplayingStranger(greeting)
    try:

        async def go():
            with pytest.raises(EventStreamAuthError, match="wrong secret"):
                await EventSubscriber(secret=SECRET).connect(*stranger.address)

        asyncio.run(go())
    finally:
        stranger.close()


def raw_subscriber(publisher: EventPublisher, prove: Callable[[dict], str | None]) -> int:
    """Events a hand-made subscriber gets when it answers the greeting with ``prove(greeting)``."""
    nonce = bytes(range(32))
    with socket.create_connection(publisher.address, timeout=5) as sock:
        reader = sock.makefile("rb")
        sock.sendall(json.dumps({"nonce": nonce.hex()}).encode() + b"\n")
        greeting = json.loads(reader.readline())
        proof = prove({**greeting, "subscriber_nonce": nonce})
        if proof is not None:
            sock.sendall(json.dumps({"mac": proof}).encode() + b"\n")
        while not publisher.has_subscribers:
            time.sleep(0.01)
        time.sleep(0.3)  # the handshake timeout below runs out
        publisher.publish({"ev": [{"id": "a", "i": 0, "s": 0.5}]})
        publisher.close()
        return sum(1 for line in reader if b'"ev"' in line)  # until the publisher hangs up


def true_proof(greeting: dict) -> str:
    theirs = bytes.fromhex(greeting["nonce"])
    message = b"trajguard-events/v1/subscriber" + theirs + greeting["subscriber_nonce"]
    return hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()


def test_publisher_hangs_up_on_a_subscriber_without_the_secret(publish):
    assert raw_subscriber(publish(SECRET), true_proof) == 1  # control: the proof works
    # A wrong proof, or none within the handshake timeout: no events.
    assert raw_subscriber(publish(SECRET), lambda greeting: "ab" * 32) == 0
    assert raw_subscriber(publish(SECRET, handshake_timeout=0.2), lambda greeting: None) == 0


def test_without_a_secret_only_loopback_is_allowed():
    with pytest.raises(ConfigError, match="TRAJGUARD_EVENTS_SECRET"):
        EventPublisher("0.0.0.0", 0, hello=HELLO)
    publisher = EventPublisher("0.0.0.0", 0, hello=HELLO, secret=SECRET)
    publisher.close()
    with pytest.raises(ConfigError, match="TRAJGUARD_EVENTS_SECRET"):
        asyncio.run(EventSubscriber().connect("10.1.2.3", 7461))
    with pytest.raises(ConfigError, match="TRAJGUARD_EVENTS_SECRET"):
        read_hello("gpu-7", 7461)


def test_plugin_settings_apply_the_same_rule():
    active = {"TRAJGUARD_PROBE": "/probe"}
    with pytest.raises(ConfigError, match="TRAJGUARD_EVENTS_SECRET"):
        PluginSettings.from_env({**active, "TRAJGUARD_EVENTS": "0.0.0.0:7461"})
    with pytest.raises(ConfigError, match="at least 16"):
        PluginSettings.from_env({**active, "TRAJGUARD_EVENTS_SECRET": "short"})
    loopback = PluginSettings.from_env(active)
    assert loopback.events == ("127.0.0.1", 7461) and loopback.events_secret is None
    # An inactive plugin (no probe) publishes nothing, so it never stops vLLM from starting.
    assert PluginSettings.from_env({"TRAJGUARD_EVENTS": "0.0.0.0:7461"}).probe is None
