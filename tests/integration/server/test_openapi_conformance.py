"""The served ``/openapi.json`` tells the truth about the server behind it.

Schemathesis generates valid and invalid requests for every documented operation from
the document a live server serves, and checks each answer: never a 5xx, a documented
status, a documented content type and, for JSON, the documented body schema. A document
that promises FastAPI's 422 where the server answers OpenAI's 400 fails here.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from server.app import build_app
from server.config import ServerConfig
from tests.integration.server.conftest import (
    MODEL,
    LiveServer,
    constant_probe,
    make_engine,
    start_server,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def live(tiny_tokenizer) -> Iterator[LiveServer]:
    """A small-context server (generations stay short) that honours unguarded requests."""
    engine, decoder = make_engine(tiny_tokenizer, probe=constant_probe(), max_context=64)
    config = ServerConfig(model=MODEL, max_n=2, request_timeout_s=30, allow_unguarded_requests=True)
    server = start_server(build_app(config, engine, environ={}), engine, decoder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def document(live) -> dict:
    return httpx.get(f"{live.base_url}/openapi.json").json()


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_answers_match_the_document(api_schema, mode):
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to get wrong in a GET without parameters

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_as_documented(case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=30)

        answers_as_documented()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "label, body",
    [
        ("POST /v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("POST /v1/completions", {"prompt": "hi"}),
    ],
)
def test_generations_match_the_document(api_schema, label, body, stream):
    """Generated bodies mostly fail validation: check the answers that stream or generate."""
    operation = api_schema.find_operation_by_label(label)
    case = operation.Case(
        body={**body, "max_tokens": 4, "stream": stream}, media_type="application/json"
    )
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    assert response.status_code == 200


def test_errors_are_documented_in_openai_shape_and_422_is_gone(document):
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            errors = {s: r for s, r in responses.items() if int(s) >= 400}
            assert "500" in errors, (method, path)
            for status, response in errors.items():
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (
                    method,
                    path,
                    status,
                )
    for path in ("/v1/chat/completions", "/v1/completions"):
        documented = set(document["paths"][path]["post"]["responses"])
        assert documented == {"200", "400", "401", "404", "413", "429", "500", "503", "504"}
        assert set(document["paths"][path]["post"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }


def test_health_and_metrics_are_documented_as_served(live, document):
    health = document["paths"]["/health"]["get"]["responses"]
    assert set(health) == {"200", "500", "503"}
    assert health["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HealthStatus"
    }
    resp = httpx.get(f"{live.base_url}/health")
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"status": "ok", "model": MODEL, "backend": "local", "guarded": True}

    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert set(metrics["200"]["content"]) == {"text/plain"}
    resp = httpx.get(f"{live.base_url}/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    assert "trajguard_num_requests_running" in resp.text
