"""The proxy trusts only the engine's own score stream, and fails closed when it is lost.

A scripted upstream plays vLLM and the plugin's event publisher; the proxy runs with no
shadow model, so the fast path is the only source of scores.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from guard import GuardConfig
from guard.vllm.channel import EventPublisher, probe_digest
from server.app import build_app
from server.config import ServerConfig
from server.upstream import UpstreamVLLMEngine
from tests.helpers import fitted_probe
from tests.scripted_upstream import ScriptedUpstream

SECRET = "a shared secret of some length"
MESSAGES = [{"role": "user", "content": "Sure, here is how"}]


@pytest.fixture
def probe():
    probe = fitted_probe(32)
    probe.threshold_ = 0.5
    return probe


@pytest.fixture
def publisher_for(probe):
    """``publisher_for(secret)``: a plugin-like publisher naming ``probe`` (right digest)."""
    started: list[EventPublisher] = []

    def make(secret: str | None) -> EventPublisher:
        hello = {
            "hook_name": probe.hook_name,
            "probe_digest": probe_digest(probe.coef_, probe.intercept_),
        }
        started.append(EventPublisher("127.0.0.1", 0, hello=hello, secret=secret))
        return started[-1]

    yield make
    for publisher in started:
        publisher.close()


def engine_for(tokenizer, probe, publisher, upstream, *, secret: str | None):
    return UpstreamVLLMEngine(
        "http://upstream",
        tokenizer=tokenizer,
        scorer=None,  # no shadow model: the event stream or nothing
        config=GuardConfig(holdback=2),
        model_name="m",
        probe=probe,
        events=publisher.address,
        events_secret=secret,
        transport=upstream.transport(),
        timeout=5.0,
    )


def fast_path_after_start(engine: UpstreamVLLMEngine) -> tuple[bool, bool]:
    async def go():
        await engine.start()
        try:
            return engine.fast_path, engine.errored
        finally:
            await engine.shutdown()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("publisher_secret", "proxy_secret"),
    [(None, SECRET), ("another secret of some length", SECRET), (SECRET, None)],
)
def test_a_strangers_stream_is_refused(
    tiny_tokenizer, probe, publisher_for, publisher_secret, proxy_secret
):
    publisher = publisher_for(publisher_secret)
    upstream = ScriptedUpstream(publisher=publisher)
    engine = engine_for(tiny_tokenizer, probe, publisher, upstream, secret=proxy_secret)
    # Refused, and with no shadow model the engine cannot serve guarded requests at all.
    assert fast_path_after_start(engine) == (False, True)


def test_the_engines_own_stream_is_trusted(tiny_tokenizer, probe, publisher_for):
    publisher = publisher_for(SECRET)
    upstream = ScriptedUpstream(publisher=publisher)
    engine = engine_for(tiny_tokenizer, probe, publisher, upstream, secret=SECRET)
    assert fast_path_after_start(engine) == (True, False)


class CutAfter:
    """Publishes the scores of a pass's first ``n`` tokens, then drops the stream."""

    def __init__(self, publisher: EventPublisher, n: int) -> None:
        self.publisher, self.n = publisher, n

    def publish(self, message: dict) -> None:
        self.publisher.publish({"ev": [e for e in message["ev"] if e["i"] < self.n]})
        self.publisher.close()  # queued lines go out first, then the connection closes


@pytest.fixture
def losing_client(tiny_tokenizer, probe, publisher_for):
    """A live proxy app whose upstream's event stream breaks after 3 token scores."""
    publisher = publisher_for(SECRET)
    upstream = ScriptedUpstream(publisher=CutAfter(publisher, 3))
    engine = engine_for(tiny_tokenizer, probe, publisher, upstream, secret=SECRET)
    config = ServerConfig(backend="vllm", upstream="http://upstream", sse_ping_interval_s=None)
    with TestClient(build_app(config, engine, environ={})) as client:
        assert engine.fast_path
        while not publisher.has_subscribers:
            time.sleep(0.01)
        yield client


def assert_engine_unavailable(error: dict) -> None:
    assert error["type"] == "service_unavailable" and error["code"] == "engine_unavailable"
    assert "event stream lost" in error["message"]


def test_losing_the_stream_mid_request_answers_503(losing_client):
    body = {"messages": MESSAGES, "max_tokens": 8, "ignore_eos": True}
    response = losing_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert set(response.json()) == {"error"}
    assert_engine_unavailable(response.json()["error"])
    # The proxy knows it can no longer guard: health and new requests are 503 too.
    assert losing_client.get("/health").status_code == 503
    assert losing_client.post("/v1/chat/completions", json=body).status_code == 503


def test_losing_the_stream_mid_stream_ends_with_an_error_frame(losing_client):
    body = {"messages": MESSAGES, "max_tokens": 8, "ignore_eos": True, "stream": True}
    body["trajguard"] = {"return_scores": True}
    with losing_client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200  # the stream had begun
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])
    assert set(error) == {"error"}
    assert_engine_unavailable(error["error"])
    # Only the token that cleared the holdback before the loss was sent (3 scored - 2 held).
    chunks = [json.loads(f)["choices"][0] for f in frames[:-2]]
    assert [s for c in chunks for s in (c.get("trajguard") or {}).get("scores", [])] == [0.1]
