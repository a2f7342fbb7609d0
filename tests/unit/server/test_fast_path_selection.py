"""How the proxy finds the upstream plugin's event stream and decides it may trust it."""

from __future__ import annotations

import pytest

from guard.errors import ConfigError
from guard.vllm.channel import probe_digest
from server.upstream_scores import same_probe, upstream_events_address
from tests.helpers import fitted_probe


def test_events_address_defaults_to_the_plugin_port_on_the_upstream_host():
    assert upstream_events_address("http://gpu-7:8001", {}) == ("gpu-7", 7461)
    assert upstream_events_address("http://gpu-7:8001", {"TRAJGUARD_UPSTREAM_EVENTS": "h:9"}) == (
        "h",
        9,
    )
    assert upstream_events_address("http://x:1", {"TRAJGUARD_UPSTREAM_EVENTS": "off"}) is None
    with pytest.raises(ConfigError):
        upstream_events_address("http://x:1", {"TRAJGUARD_UPSTREAM_EVENTS": "nonsense"})


def test_only_a_hello_naming_the_same_probe_is_trusted():
    probe = fitted_probe(8)
    other = fitted_probe(8, seed=1)
    hello = {
        "hook_name": probe.hook_name,
        "probe_digest": probe_digest(probe.coef_, probe.intercept_),
    }
    assert same_probe(hello, probe)
    assert not same_probe(hello, other)  # same hook, other weights
    assert not same_probe({**hello, "hook_name": "blocks.0.hook_resid_post"}, probe)
    assert not same_probe(None, probe)
