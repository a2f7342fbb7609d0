"""History false-trigger benchmark against a real ``trajguard serve`` app (tiny model)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.history_false_triggers import run
from benchmarks.serve_load import _start_server
from guard import GuardedEngine, LinearProbe, load_model
from server.app import build_app
from server.config import ServerConfig
from server.local import LocalGuardEngine


@pytest.mark.parametrize("monitor_history", [True, False])
def test_history_is_judged_over_http(
    isolated_home, tiny_model_dir, tiny_probe_dir, monitor_history
):
    """A threshold every score clears: every history fires, unless history is not judged."""
    lm = load_model(str(tiny_model_dir))
    config = ServerConfig(threshold=1e-6, policy="stop", monitor_history=monitor_history)
    probe = LinearProbe.load(tiny_probe_dir)
    decoder = GuardedEngine(
        lm.model, lm.tokenizer, probe, config.guard_config(), strict_probe=False
    )
    app = build_app(config, LocalGuardEngine(decoder, model_name="tiny"), environ={})
    server, thread, url = _start_server(app)
    try:
        result = asyncio.run(
            run(url, 1, 0, None, 4, answer_tokens=6, reply_tokens=3, data_dir=None)
        )
    finally:
        server.should_exit = True
        thread.join(10)
    summary = result["summary"]
    own, reference = summary["own"]["overall"], summary["reference"]["overall"]
    assert summary["own"]["errors"] == summary["reference"]["errors"] == 0
    assert own["history_fired"]["n"] >= 8 and reference["history_fired"]["n"] >= 5
    assert own["turn1_fired"]["rate"] == 1.0
    expected = 1.0 if monitor_history else 0.0
    assert own["history_fired"]["rate"] == reference["history_fired"]["rate"] == expected
    assert {r["source"] for r in result["records"]} >= {"arena_hard", "nq_open"}
