"""Thin HTTP routes: fetch the handler from ``app.state``, dispatch on the result type."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from server.errors import error_responses
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.sse import EventStream, SSEResponse

T = TypeVar("T")
router = APIRouter()


class HealthStatus(BaseModel):
    """``GET /health`` when the engine can serve (otherwise a 503 error body)."""

    status: Literal["ok"] = "ok"
    model: str = Field(description="The served model name.")
    backend: str = Field(description="``local`` or ``vllm`` (``ServerConfig.backend``).")
    guarded: bool = Field(description="Whether a probe monitors requests.")


# One server-sent event of a stream (``itemSchema``, as FastAPI documents its own streams).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk as JSON, an OpenAI error body (then the stream ends), "
            "or ``[DONE]`` (the last event).",
        }
    },
}


def _generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation route's answers: JSON, a server-sent event stream, or an OpenAI error."""
    ok = {
        "model": model,
        "description": f"A {model.__name__}, or with ``stream`` server-sent events of its chunks.",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
    }
    return {200: ok, **error_responses(400, 401, 404, 413, 429, 500, 503, 504)}


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def with_cancellation(coro: Awaitable[T], request: Request) -> T | None:
    """Await ``coro`` unless the client disconnects first; then cancel it (its cleanup
    aborts the engine requests) and return ``None``."""
    handler = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not handler.done():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
    return None if handler.cancelled() else handler.result()


def _respond(result: object, raw_request: Request) -> Response:
    if result is None:  # the client went away
        return Response(status_code=499)
    if isinstance(result, EventStream):
        return SSEResponse(result, send_timeout=raw_request.app.state.config.sse_send_timeout_s)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_chat
    return _respond(
        await with_cancellation(handler.create_chat_completion(request), raw_request), raw_request
    )


@router.post("/v1/completions", responses=_generation_responses(CompletionResponse))
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_completion
    return _respond(
        await with_cancellation(handler.create_completion(request), raw_request), raw_request
    )


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 500))
async def show_models(raw_request: Request) -> Response:
    engine = raw_request.app.state.engine
    card = ModelCard(
        id=engine.model_name, max_model_len=engine.max_model_len, trajguard=engine.fingerprint
    )
    models = ModelList(data=[card])
    return _respond(models, raw_request)


@router.get("/health", response_model=HealthStatus, responses=error_responses(500, 503))
async def health(raw_request: Request) -> Response:
    engine = raw_request.app.state.engine
    await engine.check_health()  # EngineDeadError -> 503
    status = HealthStatus(
        model=engine.model_name,
        backend=raw_request.app.state.config.backend,
        guarded=engine.guarded,
    )
    return _respond(status, raw_request)


@router.get(
    "/metrics",
    response_class=Response,  # no default JSON 200: the content types are listed here
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(500),
    },
)
async def metrics(raw_request: Request) -> Response:
    registry = raw_request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


def attach_router(app: FastAPI) -> None:
    """Mount the OpenAI-compatible routes."""
    app.include_router(router)
