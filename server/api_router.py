"""Thin HTTP routes: fetch the handler from ``app.state``, dispatch on the result type."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.sse import EventStream, SSEResponse

T = TypeVar("T")
router = APIRouter()


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


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_chat
    return _respond(
        await with_cancellation(handler.create_chat_completion(request), raw_request), raw_request
    )


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_completion
    return _respond(
        await with_cancellation(handler.create_completion(request), raw_request), raw_request
    )


@router.get("/v1/models")
async def show_models(raw_request: Request) -> Response:
    engine = raw_request.app.state.engine
    card = ModelCard(
        id=engine.model_name, max_model_len=engine.max_model_len, trajguard=engine.fingerprint
    )
    models = ModelList(data=[card])
    return _respond(models, raw_request)


@router.get("/health")
async def health(raw_request: Request) -> Response:
    await raw_request.app.state.engine.check_health()  # EngineDeadError -> 503
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    registry = raw_request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


def attach_router(app: FastAPI) -> None:
    """Mount the OpenAI-compatible routes."""
    app.include_router(router)
