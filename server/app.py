"""``build_app``: the ASGI app factory (lifespan, app state, error mapping, limits)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.errors import TrajguardError
from guard.version import __version__
from server.api_router import attach_router
from server.auth import APIKeyMiddleware, resolve_api_keys
from server.backends import build_engine
from server.config import ServerConfig
from server.engine import GuardEngine
from server.errors import (
    APIError,
    PayloadTooLargeError,
    TooManyRequestsError,
    error_json_response,
    send_error,
)
from server.metrics import GENERATION_ENDPOINTS, MetricsMiddleware, ServerMetrics
from server.serving_chat import ServingChat
from server.serving_completion import ServingCompletion

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset(GENERATION_ENDPOINTS)


class BodySizeLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (by Content-Length, then by bytes read)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await send_error(scope, receive, send, too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await send_error(scope, receive, send, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ConcurrencyLimitMiddleware:
    """429 when ``limit`` generation requests are already in flight (streams count until done)."""

    def __init__(self, app: ASGIApp, *, limit: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await send_error(
                scope,
                receive,
                send,
                TooManyRequestsError(
                    f"server is at its limit of {self.limit} concurrent requests; retry later"
                ),
                headers={"Retry-After": "1"},
            )
            return
        self.in_flight += 1
        self.metrics.running.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.running.dec()


def init_app_state(
    state: State, engine: GuardEngine, config: ServerConfig, metrics: ServerMetrics
) -> None:
    """Put the engine and the serving objects on ``app.state``."""
    state.engine = engine
    state.config = config
    state.metrics = metrics
    state.serving_chat = ServingChat(engine, config, metrics=metrics)
    state.serving_completion = ServingCompletion(engine, config, metrics=metrics)


async def _handle_error(request: Request, exc: Exception) -> Response:
    return error_json_response(exc)


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return error_json_response(exc)


def drop_validation_422(app: FastAPI) -> None:
    """Remove FastAPI's default 422 from ``app``'s OpenAPI document.

    Bad bodies are 400s in OpenAI's error shape (``server.errors``), which the routes
    document themselves; the 422 FastAPI adds to every route with a body never happens.
    """
    generate = app.openapi  # caches the document in ``app.openapi_schema``

    def openapi() -> dict[str, Any]:
        document = generate()
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                operation.get("responses", {}).pop("422", None)
        schemas = document.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(
    config: ServerConfig,
    engine: GuardEngine | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> FastAPI:
    """Build the app; the engine starts in the lifespan (and is built there if not given).

    Args:
        config: server settings.
        engine: a ready backend (tests, benchmarks); default: the local engine of ``config``.
        environ: where to read ``TRAJGUARD_API_KEYS`` (default ``os.environ``).

    Raises:
        ConfigError: e.g. a non-loopback host without API keys.
    """
    keys = resolve_api_keys(config, environ=environ)
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = engine if engine is not None else await asyncio.to_thread(build_engine, config)
        await backend.start()
        init_app_state(app.state, backend, config, metrics)
        if config.log_bodies:
            logger.warning("log_bodies is ON: prompts and completions are logged at DEBUG level")
        logger.info(
            "serving %r (guarded=%s, auth=%s)", backend.model_name, backend.guarded, bool(keys)
        )
        try:
            yield
        finally:
            await backend.shutdown()

    app = FastAPI(title="trajguard", version=__version__, lifespan=lifespan)
    attach_router(app)
    drop_validation_422(app)
    for exc_type in (APIError, TrajguardError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc_type, _handle_error)
    app.add_exception_handler(Exception, _handle_unexpected)
    # Added innermost first: metrics -> auth -> body size -> concurrency -> routes.
    app.add_middleware(
        ConcurrencyLimitMiddleware, limit=config.max_concurrent_requests, metrics=metrics
    )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
