"""The bench's sample cache never serves a stale answer.

A key covers the weights (not the model's path), the full resolved guard config with its
threshold and probe files, and an endpoint's reported fingerprint; an identical rerun
still generates nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM

from benchmarks.bench import BenchConfig, run_bench
from benchmarks.bench.attacks import CACHE_FILE
from guard import GuardConfig, LinearProbe, load_model
from guard.models import model_fingerprint
from server.app import build_app
from server.config import ServerConfig
from server.local import LocalGuardEngine
from tests.unit.benchmarks.conftest import SOMETIMES
from training.attacks import harness
from training.attacks.harness import AttackConfig, build_engine


def _config(model: str, probe: Path | None, prompts: Path, judge: Path, out: Path) -> BenchConfig:
    """Two direct prompts per target: 2 samples undefended, 2 guarded (when ``probe``)."""
    return BenchConfig(
        models=[model],
        probes=[None if probe is None else str(probe)],
        attacks=["direct"],
        benign_limit=0,
        utility_n=0,
        harness=AttackConfig(
            attack="bench",
            prompts_file=str(prompts),
            limit=2,
            strict_probe=False,
            max_tokens=4,
            batch_size=4,
            judge=str(judge),
            out=str(out),
        ),
    )


def _run(config: BenchConfig) -> tuple[int, int]:
    run = run_bench(config, progress=False)["run"]
    return run["generated"], run["cached"]


def _retrain_in_place(model_dir: Path) -> None:
    """Nudge every weight and save over the same directory (same path, new weights)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(model_dir)


def _with_threshold(probe_dir: Path, threshold: float, out: Path) -> Path:
    probe = LinearProbe.load(probe_dir)
    probe.threshold_ = threshold
    return probe.save(out)


@pytest.fixture
def own_copies(tiny_model_dir, tiny_probe_dir, tmp_path) -> tuple[Path, Path]:
    """A model and a probe this test may rewrite in place."""
    model, probe = tmp_path / "model", tmp_path / "probe"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_probe_dir, probe)
    return model, probe


def test_local_cache_follows_weights_and_guard_config(
    isolated_home, own_copies, split_prompts_file, tiny_judge_dir, tmp_path, monkeypatch
) -> None:
    model, probe = own_copies
    config = _config(str(model), probe, split_prompts_file, tiny_judge_dir, tmp_path / "bench")
    assert _run(config) == (4, 0)
    assert _run(config) == (0, 4)  # identical rerun: all cached

    before = model_fingerprint(load_model(str(model)).model)
    _retrain_in_place(model)
    assert model_fingerprint(load_model(str(model)).model) != before
    assert _run(config) == (4, 0)  # same path, new weights: both defences generate again
    assert _run(config) == (0, 4)

    _with_threshold(probe, 0.6, probe)  # recalibrated in place
    assert _run(config) == (2, 2)  # only the guarded samples depend on the probe

    # A changed library default (here the holdback) is part of the resolved config.
    monkeypatch.setattr(harness, "GuardConfig", functools.partial(GuardConfig, holdback=1))
    assert _run(config) == (2, 2)
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    guarded = results["targets"][f"{model.name}|guard:rollback"]
    assert guarded["guard"]["config"]["holdback"] == 1
    assert guarded["guard"]["threshold"] == pytest.approx(0.6)
    assert guarded["model_fingerprint"] == model_fingerprint(load_model(str(model)).model)
    assert results["targets"][f"{model.name}|none"]["guard"] is None

    monkeypatch.undo()  # back to the default holdback: those samples are still cached
    assert _run(config) == (0, 4)
    keys = [json.loads(line)["key"] for line in (tmp_path / "bench" / CACHE_FILE).open()]
    assert len(keys) == len(set(keys)) == 4 + 4 + 2 + 2  # append-only, one line per sample


def _serve(engine: LocalGuardEngine, port: int = 0) -> tuple[uvicorn.Server, threading.Thread]:
    app = build_app(ServerConfig(), engine, environ={})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return server, thread


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(10)


def test_endpoint_cache_follows_the_reported_fingerprint(
    isolated_home, own_copies, split_prompts_file, tiny_judge_dir, tmp_path, monkeypatch, caplog
) -> None:
    model, probe = own_copies
    lm = load_model(str(model))
    engines = {
        "served": LocalGuardEngine(
            build_engine(lm, probe, "stop", strict_probe=False), model_name="tiny"
        ),
        "recalibrated": LocalGuardEngine(
            build_engine(
                lm, _with_threshold(probe, 0.6, tmp_path / "p2"), "stop", strict_probe=False
            ),
            model_name="tiny",
        ),
    }
    server, thread = _serve(engines["served"])
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = _config(f"{model}@{url}/v1", None, split_prompts_file, tiny_judge_dir, tmp_path / "b")
    try:
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["trajguard"] == {
            "model_fingerprint": model_fingerprint(lm.model),
            "probe_digest": engines["served"].fingerprint["probe_digest"],
            "threshold": pytest.approx(SOMETIMES),
            "guard_config": engines["served"].fingerprint["guard_config"],
        }
        assert _run(config) == (2, 0)
        assert _run(config) == (0, 2)
    finally:
        _stop(server, thread)

    # the same URL and model id, another threshold behind them
    server, thread = _serve(engines["recalibrated"], port)
    try:
        reported = httpx.get(f"{url}/v1/models").json()["data"][0]["trajguard"]
        assert reported["threshold"] == pytest.approx(0.6)
        assert reported["model_fingerprint"] == card["trajguard"]["model_fingerprint"]
        assert reported["probe_digest"] != card["trajguard"]["probe_digest"]
        assert _run(config) == (2, 0)
        assert _run(config) == (0, 2)
    finally:
        _stop(server, thread)

    # an endpoint without a fingerprint (vLLM, the upstream proxy) is known by its id alone
    monkeypatch.setattr(LocalGuardEngine, "fingerprint", property(lambda self: None))
    fresh = LocalGuardEngine(build_engine(lm, probe, "stop", strict_probe=False), model_name="tiny")
    server, thread = _serve(fresh, port)  # a stopped engine does not restart
    try:
        assert "trajguard" not in httpx.get(f"{url}/v1/models").json()["data"][0]
        with caplog.at_level(logging.WARNING, logger="training.common.endpoint"):
            assert _run(config) == (2, 0)
        assert "reports no weight fingerprint" in caplog.text
        results = json.loads((tmp_path / "b" / "results.json").read_text())
        (identity,) = results["targets"].values()
        assert identity["model_id"] == "tiny" and identity["reported"] is None
    finally:
        _stop(server, thread)
