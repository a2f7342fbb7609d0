"""Server-side errors and the one place that maps any exception to (HTTP status, OpenAI error).

=============================  ======  =======================  =========================
exception                      status  type                     code
=============================  ======  =======================  =========================
RequestValidationError         400     invalid_request_error    invalid_request
GuardValidationError           400     invalid_request_error    invalid_value
ContextLengthError             400     invalid_request_error    context_length_exceeded
AuthenticationError            401     authentication_error     invalid_api_key
UnknownModelError              404     not_found_error          model_not_found
HTTPException(404/405/...)     same    invalid_request_error    http_<status>
PayloadTooLargeError           413     invalid_request_error    request_too_large
PromptTooLargeError            413     invalid_request_error    prompt_too_large
TooManyRequestsError           429     rate_limit_error         too_many_requests
EngineDeadError                503     service_unavailable      engine_unavailable
EngineStepError                503     service_unavailable      engine_error
GuardFailureError              503     guard_error              guard_monitor_failed
RequestTimeoutError            504     timeout_error            request_timeout
anything else                  500     internal_error           internal_error
=============================  ======  =======================  =========================

A guard *intervention* is not an error (``finish_reason="content_filter"``); a guard
*failure* under ``on_monitor_error="block"`` is: the answer is withheld (fail closed).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guard.errors import ContextLengthError, GuardValidationError
from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with a fixed HTTP status and OpenAI error type."""

    status_code = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AuthenticationError(APIError):
    status_code, type, code = 401, "authentication_error", "invalid_api_key"


class UnknownModelError(APIError):
    status_code, type, code = 404, "not_found_error", "model_not_found"


class PayloadTooLargeError(APIError):
    status_code, type, code = 413, "invalid_request_error", "request_too_large"


class PromptTooLargeError(APIError):
    status_code, type, code = 413, "invalid_request_error", "prompt_too_large"


class TooManyRequestsError(APIError):
    status_code, type, code = 429, "rate_limit_error", "too_many_requests"


class EngineDeadError(APIError):
    """The engine is not running (not started, failed, or shutting down)."""

    status_code, type, code = 503, "service_unavailable", "engine_unavailable"


class EngineStepError(EngineDeadError):
    """A decoding step failed; the requests in the batch were dropped, the engine goes on."""

    code = "engine_error"


class GuardFailureError(APIError):
    """The guard could not score the answer and ``on_monitor_error`` blocks it."""

    status_code, type, code = 503, "guard_error", "guard_monitor_failed"


class RequestTimeoutError(APIError):
    status_code, type, code = 504, "timeout_error", "request_timeout"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    # NOTE: only locations and messages; pydantic's "input" could echo the prompt.
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = (
        f"{param}: {first.get('msg', 'invalid value')}"
        if param
        else str(first.get("msg", "invalid request"))
    )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return message, param


def error_response(exc: BaseException) -> tuple[int, ErrorResponse]:
    """Map an exception to its HTTP status and OpenAI-shaped body (see the module table)."""
    if isinstance(exc, APIError):
        status, info = (
            exc.status_code,
            ErrorInfo(message=str(exc), type=exc.type, param=exc.param, code=exc.code),
        )
    elif isinstance(exc, ContextLengthError):
        status, info = (
            400,
            ErrorInfo(
                message=str(exc),
                type="invalid_request_error",
                param=exc.param,
                code="context_length_exceeded",
            ),
        )
    elif isinstance(exc, GuardValidationError):
        status, info = (
            400,
            ErrorInfo(
                message=str(exc),
                type="invalid_request_error",
                param=exc.param,
                code="invalid_value",
            ),
        )
    elif isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
        status, info = (
            400,
            ErrorInfo(
                message=message, type="invalid_request_error", param=param, code="invalid_request"
            ),
        )
    elif isinstance(exc, HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        status, info = (
            exc.status_code,
            ErrorInfo(message=str(exc.detail), type=kind, code=f"http_{exc.status_code}"),
        )
    else:
        status, info = (
            500,
            ErrorInfo(
                message="internal server error", type="internal_error", code="internal_error"
            ),
        )
    return status, ErrorResponse(error=info)


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: malformed body, bad or unsupported parameter, or too long a context.",
    401: "Missing or invalid API key (only when the server has keys).",
    404: "Unknown model.",
    413: "Request body or prompt too large.",
    429: "Too many concurrent requests; retry after ``Retry-After`` seconds.",
    500: "Unexpected server error.",
    503: "The engine cannot serve, a decoding step failed, or the guard failed (fail closed).",
    504: "The request ran past the server's timeout.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: ``statuses`` with the OpenAI error body."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def error_json_response(exc: BaseException, *, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response for ``exc`` (OpenAI error body, mapped status)."""
    status, body = error_response(exc)
    return Response(
        body.model_dump_json(), status_code=status, media_type="application/json", headers=headers
    )


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    exc: BaseException,
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer an ASGI request with ``exc`` (for pure ASGI middleware)."""
    await error_json_response(exc, headers=headers)(scope, receive, send)
