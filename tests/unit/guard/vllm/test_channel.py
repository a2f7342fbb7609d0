"""The event stream between the engine and the proxy, over real loopback sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guard.vllm.channel import EventPublisher, EventSubscriber, probe_digest, read_hello


@pytest.fixture
def publisher():
    pub = EventPublisher("127.0.0.1", 0, hello={"hook_name": "blocks.1.hook_resid_post"})
    yield pub
    pub.close()


def test_read_hello(publisher):
    assert read_hello(*publisher.address) == {"hook_name": "blocks.1.hook_resid_post"}
    publisher.close()
    assert read_hello(*publisher.address, timeout=0.5) is None


def test_subscriber_routes_events_by_key(publisher):
    async def go():
        sub = EventSubscriber()
        assert (await sub.connect(*publisher.address))["hook_name"].startswith("blocks")
        feed = sub.watch("a")
        while not publisher.has_subscribers:
            await asyncio.sleep(0.01)
        publisher.publish({"ev": [{"id": "b", "i": 0, "s": 0.9}, {"id": "a", "i": 1, "s": 0.2}]})
        publisher.publish({"ev": [{"id": "a", "i": 0, "s": 0.1}]})
        got = [await feed.get(i, timeout=5) for i in (0, 1)]
        await sub.close()
        return got

    got = asyncio.run(go())
    assert [e["s"] for e in got] == [0.1, 0.2]


def test_lost_stream_fails_waiters(publisher):
    async def go():
        sub = EventSubscriber()
        await sub.connect(*publisher.address)
        feed = sub.watch("a")
        publisher.close()
        with pytest.raises(ConnectionError):
            await feed.get(0, timeout=5)
        await sub.close()

    asyncio.run(go())


def test_missing_event_times_out(publisher):
    async def go():
        sub = EventSubscriber()
        await sub.connect(*publisher.address)
        with pytest.raises(TimeoutError):
            await sub.watch("a").get(0, timeout=0.2)
        await sub.close()

    asyncio.run(go())


def test_probe_digest_changes_with_weights():
    coef = np.arange(4.0)
    assert probe_digest(coef, 0.5) == probe_digest(coef.copy(), 0.5)
    assert probe_digest(coef, 0.5) != probe_digest(coef, 0.25)
