"""Every error status, in OpenAI's error shape, and never a 5xx for bad input."""

from __future__ import annotations

import json
from unittest.mock import MagicMock

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from guard import ConfigError, RequestOutput
from server.app import build_app
from server.auth import resolve_api_keys
from server.config import ServerConfig
from server.engine import GuardEngine
from server.errors import EngineDeadError
from tests.integration.server.conftest import MODEL, constant_probe, sse_frames

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}


def post(live, body, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", json=body, **kwargs)


def assert_error(
    resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "update, param, code",
    [
        ({"messages": None}, "messages", None),
        ({"messages": []}, "messages", None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", None),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
            None,
        ),
        ({"temperature": 5}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", None),
        ({"stop": [""]}, "stop", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_tokens": 10**6}, "max_tokens", "context_length_exceeded"),
        (
            {"messages": [{"role": "user", "content": "fox " * 400}]},
            "prompt",
            "context_length_exceeded",
        ),
        ({"seed": 2**70}, "seed", None),
        ({"n": 100}, "n", None),
        ({"logprobs": True}, "logprobs", None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", None),
        ({"trajguard": {"guard": False}}, "trajguard.guard", None),
        ({"trajguard": {"retrun_scores": True}}, "trajguard.retrun_scores", None),
        ({"continue_final_message": True}, "continue_final_message", None),
    ],
)
def test_bad_requests_are_400(shared_server, update, param, code):
    body = {k: v for k, v in (CHAT | update).items() if v is not None}
    assert_error(post(shared_server, body), 400, param=param, code=code)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_malformed_bodies_are_400(shared_server, content):
    resp = httpx.post(
        f"{shared_server.base_url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert_error(resp, 400, code="invalid_request")


def test_openai_client_sees_bad_request(shared_server):
    with pytest.raises(openai.BadRequestError) as info:
        shared_server.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=3
        )
    assert info.value.body["param"] == "temperature"


def test_unknown_model_and_route_are_404(shared_server):
    with pytest.raises(openai.NotFoundError) as info:
        shared_server.client().chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    assert_error(httpx.get(f"{shared_server.base_url}/v1/nope"), 404)
    assert_error(httpx.get(f"{shared_server.base_url}/v1/chat/completions"), 405)


def test_api_keys_401(make_server):
    live = make_server(probe=constant_probe(), environ={"TRAJGUARD_API_KEYS": "key-one, key-two"})
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        error = assert_error(post(live, CHAT, headers=headers), 401, code="invalid_api_key")
        assert error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").models.list()
    assert live.client(api_key="key-two").chat.completions.create(**CHAT).choices
    assert httpx.get(f"{live.base_url}/health").status_code == 200  # open for probes


def test_auth_is_required_off_loopback():
    with pytest.raises(ConfigError, match="API keys"):
        build_app(ServerConfig(host="0.0.0.0"), MagicMock(spec=GuardEngine), environ={})
    build_app(
        ServerConfig(host="0.0.0.0"),
        MagicMock(spec=GuardEngine),
        environ={"TRAJGUARD_API_KEYS": "k"},
    )


def test_api_keys_from_config_env_and_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfrom-file\n\n")
    config = ServerConfig(api_keys=("from-config",), api_keys_file=keys_file)
    keys = resolve_api_keys(config, environ={"TRAJGUARD_API_KEYS": "a, b,"})
    assert sorted(keys) == ["a", "b", "from-config", "from-file"]
    assert "from-config" not in repr(config)
    with pytest.raises(ConfigError, match="api_keys_file"):
        resolve_api_keys(ServerConfig(api_keys_file=tmp_path / "missing"), environ={})


def test_body_and_prompt_limits_413(make_server):
    live = make_server(probe=constant_probe(), max_body_bytes=2000, max_prompt_tokens=30)
    big = CHAT | {"messages": [{"role": "user", "content": "x" * 3000}]}
    assert_error(post(live, big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit must count the bytes actually read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    resp = httpx.post(
        f"{live.base_url}/v1/chat/completions",
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, code="request_too_large")
    long_prompt = CHAT | {"messages": [{"role": "user", "content": "fox " * 40}]}
    assert_error(post(live, long_prompt), 413, code="prompt_too_large")
    assert post(live, CHAT).status_code == 200


def test_concurrency_limit_429(make_server):
    live = make_server(probe=constant_probe(), max_concurrent_requests=1, step_delay=0.02)
    slow = CHAT | {"max_tokens": 200, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=live.base_url) as client,
        client.stream("POST", "/v1/chat/completions", json=slow) as resp,
    ):
        lines = resp.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)
        with pytest.raises(openai.RateLimitError):
            live.client().chat.completions.create(**CHAT)
        assert resp.status_code == 200
        metrics = httpx.get(f"{live.base_url}/metrics").text
        assert "\ntrajguard_num_requests_running 1.0" in metrics
    assert live.wait_idle(2.0)
    assert post(live, CHAT).status_code == 200  # the slot was released


def test_a_failed_step_drops_its_requests_and_the_engine_goes_on(make_server):
    live = make_server(probe=constant_probe())
    step, calls = live.decoder.step, []

    def fails_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated transient failure")
        return step()

    live.decoder.step = fails_once
    assert_error(post(live, CHAT), 503, code="engine_error")
    assert live.wait_idle(2.0)
    assert post(live, CHAT).status_code == 200
    assert httpx.get(f"{live.base_url}/health").status_code == 200


def test_dead_engine_is_503(make_server):
    live = make_server(probe=constant_probe())

    def broken_step():
        raise RuntimeError("simulated engine failure")

    live.decoder.step = broken_step
    assert_error(post(live, CHAT), 503, code="engine_error")
    assert_error(post(live, CHAT), 503, code="engine_unavailable")  # rejected before submission
    with pytest.raises(openai.InternalServerError):
        live.client().chat.completions.create(**CHAT)
    assert_error(httpx.get(f"{live.base_url}/health"), 503)


def test_mid_stream_engine_error_yields_one_error_frame_then_done(tiny_tokenizer):
    engine = MagicMock(spec=GuardEngine)
    engine.model_name, engine.max_model_len, engine.tokenizer, engine.guarded = (
        "mock",
        256,
        tiny_tokenizer,
        True,
    )

    async def generate(request_id, prompt, params, *, guard_options):
        async def outputs():
            yield RequestOutput(request_id, token_ids=(5,), text="Hel", scores=(0.1,))
            raise EngineDeadError("engine unavailable: simulated")

        return outputs()

    engine.generate.side_effect = generate
    with TestClient(build_app(ServerConfig(model="mock"), engine, environ={})) as client:
        resp = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    frames = sse_frames(resp.text)
    assert frames[-1] == "data: [DONE]\n\n"
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "engine_unavailable"
    assert '"content":"Hel"' in frames[-3]
    engine.abort.assert_awaited()  # the unfinished request was aborted
