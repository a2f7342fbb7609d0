"""End to end: the official openai client against a real server (chat completions)."""

from __future__ import annotations

import threading

import httpx
import pytest

from guard import encode_chat
from tests.integration.server.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Sure, here is how"}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_non_stream_answer_usage_and_guard_info(shared_server, tiny_tokenizer):
    client = shared_server.client()
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, **GREEDY)
    (choice,) = resp.choices
    assert (
        resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    )
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    prompt_ids = encode_chat(tiny_tokenizer, MESSAGES).prompt_ids
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == 8 and resp.usage.total_tokens == len(prompt_ids) + 8
    info = choice.model_extra["trajguard"]
    assert info["guarded"] and not info["triggered"] and info["max_score"] == pytest.approx(0.1)
    assert "scores" not in info


def test_stream_equals_non_stream_and_reports_usage(shared_server):
    client = shared_server.client()
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == ["length"]
    assert finals[0].model_extra["trajguard"]["triggered"] is False
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_return_scores_per_token(shared_server):
    client = shared_server.client()
    body = {"ignore_eos": True, "trajguard": {"return_scores": True}}
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, extra_body=body
    )
    scores = resp.choices[0].model_extra["trajguard"]["scores"]
    assert scores == [pytest.approx(0.1)] * 6
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, stream=True, extra_body=body
    )
    streamed = [
        s
        for c in stream
        for s in (c.choices[0].model_extra.get("trajguard") or {}).get("scores", [])
    ]
    assert streamed == scores


def test_stop_strings_cut_the_answer(shared_server):
    client = shared_server.client()
    free = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **GREEDY)
    text = free.choices[0].message.content
    stop = text[4:6]
    assert stop and len(text) > 6
    for stream in (False, True):
        resp = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, stop=[stop], stream=stream, **GREEDY
        )
        if stream:
            chunks = [c for c in resp if c.choices]
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert got == text[: text.find(stop)] and reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_separate_seeded_samples(shared_server, stream):
    client = shared_server.client()
    kwargs = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 8,
        "n": 3,
        "temperature": 1.0,
        "seed": 11,
        "extra_body": {"ignore_eos": True},
    }
    resp = client.chat.completions.create(stream=stream, **kwargs)
    if stream:
        texts = {i: "" for i in range(3)}
        for chunk in resp:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        texts = [texts[i] for i in range(3)]
    else:
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert resp.usage.completion_tokens == 24
        texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) > 1  # seed + i per choice: not three copies
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == texts  # and reproducible


def test_concurrent_requests_share_the_batch(shared_server):
    client = shared_server.client()
    prompts = ["step one", "The quick brown fox", "Here is a helpful answer", "I'm sorry"]
    solo = {
        p: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=30, **GREEDY
        )
        .choices[0]
        .message.content
        for p in prompts
    }
    shared_server.engine.peak_batch = 0
    got: dict[str, str] = {}

    def ask(p: str) -> None:
        got[p] = (
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=30, **GREEDY
            )
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == solo
    assert shared_server.engine.peak_batch >= 2


def test_models_health_and_metrics(shared_server):
    client = shared_server.client()
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == 256
    health = httpx.get(f"{shared_server.base_url}/health")
    assert health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok", "model": MODEL, "backend": "local", "guarded": True}
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, **GREEDY)
    metrics = httpx.get(f"{shared_server.base_url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "\ntrajguard_num_requests_running " in text
    assert "trajguard_num_requests_waiting 0.0" in text
    assert 'trajguard_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "trajguard_time_to_first_token_seconds_count" in text
    assert "trajguard_generation_tokens_total" in text


def test_prompts_and_answers_are_not_logged_above_debug(shared_server, caplog):
    secret = "zebra-canary-prompt"
    client = shared_server.client()
    with caplog.at_level("DEBUG"):
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": secret}], max_tokens=5, **GREEDY
        )
    answer = resp.choices[0].message.content
    loud = [r.getMessage() for r in caplog.records if r.levelno > 10]
    assert any("done in" in m for m in loud + [r.getMessage() for r in caplog.records])
    assert not any(secret in m or (answer and answer in m) for m in loud)
