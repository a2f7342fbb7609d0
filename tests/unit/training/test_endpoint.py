"""The endpoint target, moved into training: one definition, re-exported by the bench, and
imports that only go benchmarks -> training -> guard."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import httpx
import pytest

import benchmarks.bench as bench
import benchmarks.bench.targets as targets
import training.common.endpoint as endpoint
from guard import SamplingParams

REPO = Path(__file__).resolve().parents[3]


def test_the_bench_reexports_the_training_endpoint() -> None:
    assert targets.EndpointTarget is endpoint.EndpointTarget is bench.EndpointTarget
    assert targets.completion_result is endpoint.completion_result
    assert targets.Request is endpoint.Request
    tree = ast.parse((REPO / "benchmarks" / "bench" / "targets.py").read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not defined & {"EndpointTarget", "completion_result", "_kept_tokens"}  # no copy


def test_training_never_imports_benchmarks() -> None:
    offenders = []
    for path in sorted((REPO / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "benchmarks"
            ]
    assert not offenders


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:8011", "http://127.0.0.1:8011"),
        ("http://127.0.0.1:8011/", "http://127.0.0.1:8011"),
        ("https://host/v1", "https://host"),
        ("http://host:8000/v1/", "http://host:8000"),
    ],
)
def test_endpoint_base_url(url: str, base: str) -> None:
    assert endpoint.endpoint_base_url(url) == base


def test_endpoint_base_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="http"):
        endpoint.endpoint_base_url("ftp://host")


def _serve(monkeypatch: pytest.MonkeyPatch, status: int = 200) -> None:
    """A vLLM look-alike that answers later requests first and echoes the prompt's last id."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "vllm"}]})
        body = json.loads(request.content)
        last = body["prompt"][-1]
        time.sleep(0.02 * (5 - last))  # request 4 finishes first
        choice = {"text": "x", "token_ids": [last, last], "finish_reason": "length"}
        return httpx.Response(status, json={"choices": [choice]})

    client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(handler), **kw)
    )


def test_generate_keeps_request_order_while_completed_streams(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer
) -> None:
    _serve(monkeypatch)
    target = endpoint.EndpointTarget("http://fake", tiny_tokenizer, concurrency=5)
    requests = [([1, 2], [i]) for i in range(5)]
    params = [SamplingParams(max_tokens=2)] * 5
    order = [i for i, _ in target.completed(requests, params)]
    assert sorted(order) == list(range(5)) and order != list(range(5))
    results = target.generate(requests, params, desc="t", progress=False)
    assert [r.token_ids for r in results] == [[i, i] for i in range(5)]
    assert target.identity == {"url": "http://fake", "model_id": "m", "reported": None}
    target.close()


def test_a_failed_request_raises(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> None:
    _serve(monkeypatch, status=500)
    target = endpoint.EndpointTarget("http://fake", tiny_tokenizer, concurrency=2)
    with pytest.raises(RuntimeError, match="endpoint answered 500"):
        target.generate([([1], [])], [SamplingParams()], desc="t", progress=False)
