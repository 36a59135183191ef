"""The application's error tree and the one handler that renders every error.

    AppError                         status  code
    ├── Unauthorized                 401     unauthorized          (+ WWW-Authenticate)
    │   ├── InvalidApiKey            401     invalid_api_key
    │   └── KeyInQuery               401     key_in_query
    ├── Forbidden                    403     forbidden
    │   └── ModelNotAllowed          403     model_not_allowed
    ├── RateLimited                  429     rate_limited, too_many_streams,
    │                                        token_budget_exhausted, too_many_failed_attempts
    │                                        (+ Retry-After, x-ratelimit-*)
    ├── NotFound                     404     not_found
    ├── ConversationBusy             409     conversation_busy     (+ Retry-After)
    ├── IdempotencyInFlight          409     idempotency_key_in_flight (+ Retry-After)
    ├── GenerationCancelled          409     cancelled
    ├── InvalidRequest               422     invalid_request
    │   ├── MessageTooLong           422     message_too_long
    │   ├── IdempotencyConflict      422     idempotency_key_reused
    │   └── ContextTooLong           422     context_length_exceeded
    ├── PayloadTooLarge              413     payload_too_large
    ├── ServiceUnavailable           503     service_unavailable   (+ Retry-After)
    │   └── DatabaseUnavailable      503     database_unavailable
    │       └── ReplyNotStored       503     reply_not_stored
    │   └── GenerationInterrupted    503     generation_interrupted
    │   └── LimiterUnavailable       503     rate_limiter_unavailable
    └── UpstreamError                502/503/504, from a ProviderError (see `from_provider`)

Every response body is one envelope:

    {"error": {"code": "not_found", "message": "...", "details": [...]?}}

FastAPI's own 404/405/422 and unhandled exceptions (500, `internal_error`) are rendered in
the same envelope. A 500 never shows a traceback; the exception is logged server-side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from chatbot_api.llm import errors as llm_errors

logger = logging.getLogger(__name__)


class AppError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.code, self.message, self.details)


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class KeyInQuery(Unauthorized):
    code = "key_in_query"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(
            message,
            headers={"Retry-After": str(max(1, math.ceil(retry_after))), **(headers or {})},
        )
        if code is not None:
            self.code = code


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class ConversationBusy(AppError):
    status_code = 409
    code = "conversation_busy"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "A reply is being generated in this conversation; retry when it has finished.",
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )


class IdempotencyInFlight(AppError):
    status_code = 409
    code = "idempotency_key_in_flight"

    def __init__(self) -> None:
        super().__init__(
            "The first request with this Idempotency-Key is still being answered.",
            headers={"Retry-After": "1"},
        )


class GenerationCancelled(AppError):
    status_code = 409
    code = "cancelled"


class InvalidRequest(AppError):
    status_code = 422
    code = "invalid_request"


class IdempotencyConflict(InvalidRequest):
    code = "idempotency_key_reused"


class MessageTooLong(InvalidRequest):
    code = "message_too_long"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class ReplyNotStored(DatabaseUnavailable):
    code = "reply_not_stored"


class GenerationInterrupted(ServiceUnavailable):
    code = "generation_interrupted"


class LimiterUnavailable(ServiceUnavailable):
    code = "rate_limiter_unavailable"


class UpstreamError(AppError):
    """A provider failure, with the status and code that fit it."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.status_code = status_code
        self.code = code

    @classmethod
    def from_provider(cls, exc: llm_errors.ProviderError) -> UpstreamError:
        headers: dict[str, str] = {}
        if isinstance(exc, llm_errors.ProviderRateLimited):
            if exc.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return cls(503, "upstream_rate_limited", exc.message, headers)
        if isinstance(exc, llm_errors.ProviderUnavailable):
            return cls(503, "upstream_unavailable", exc.message, {"Retry-After": "1"})
        if isinstance(exc, llm_errors.ProviderTimeout):
            return cls(504, "upstream_timeout", exc.message, headers)
        if isinstance(exc, llm_errors.ProviderAuthError):
            return cls(502, "upstream_auth_failed", exc.message, headers)
        if isinstance(exc, llm_errors.ProviderRequestRejected):
            return cls(502, "upstream_rejected", exc.message, headers)
        if isinstance(exc, llm_errors.ProviderBadResponse):
            return cls(502, "upstream_bad_response", exc.message, headers)
        return cls(502, "upstream_error", exc.message, headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_envelope(code: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[Any] | None = None


class ErrorEnvelope(BaseModel):
    """The one shape of every error response, for the OpenAPI schema."""

    error: ErrorBody


_STATUS_DESCRIPTIONS = {
    400: "The body could not be parsed.",
    401: "No API key, or not a valid one (`WWW-Authenticate: Bearer`).",
    403: "The key's scope does not allow this, or the model is not allowed.",
    404: "No such object, or not one of yours: the same answer either way.",
    413: "The body is over the size limit.",
    422: "The request is invalid.",
    429: "A limit of this key or client was exceeded (`Retry-After`, `x-ratelimit-*`).",
    503: "The database or the rate limiter is unavailable (`Retry-After`).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can answer, all in the envelope's shape."""
    return {
        status: {"model": ErrorEnvelope, "description": _STATUS_DESCRIPTIONS[status]}
        for status in statuses
    }


def _render(
    status: int, envelope: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(envelope, status_code=status, headers=headers)


async def _app_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return _render(exc.status_code, exc.envelope(), exc.headers)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method served at this path: Starlette's own `Allow` names only the first route
    that matched the path, and RFC 9110 wants them all."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 404 and message == "Not Found":
        message = "No such resource."
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return _render(exc.status_code, error_envelope(code, message), headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    return _render(
        422,
        error_envelope("validation_error", "The request is invalid.", jsonable_encoder(details)),
    )


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # Pool exhausted, connection refused or lost, SQLite "database is locked": all transient.
    logger.warning("database unavailable: %s", type(exc).__name__)
    return _app_error_response(DatabaseUnavailable("The database is unavailable; retry shortly."))


def _app_error_response(exc: AppError) -> JSONResponse:
    return _render(exc.status_code, exc.envelope(), exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _render(500, error_envelope("internal_error", "An internal error occurred."))


# Connection exceptions, admin shutdown / crash shutdown / cannot connect now, too many clients.
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "40001", "40P01")


def is_transient_db_error(exc: BaseException) -> bool:
    """Pool exhausted, connection refused or lost, SQLite busy: worth a retry later.

    A refused connection reaches us as a bare `OSError` (asyncpg connects before SQLAlchemy
    can wrap anything); provider I/O errors never get here, `llm/` maps them first."""
    if isinstance(exc, PoolTimeoutError | OperationalError | OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    # A restarting PostgreSQL: "cannot connect now" (57P03) at connect, "terminating
    # connection due to administrator command" (57P01) mid-query, and connection exceptions
    # (08xxx); too many connections (53300); and a transaction PostgreSQL aborted to break a
    # deadlock (40P01) or a serialization conflict (40001), which it asks to retry. asyncpg
    # raises them as PostgresError, which SQLAlchemy wraps in a bare DBAPIError.
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    return exc.connection_invalidated or sqlstate.startswith(TRANSIENT_SQLSTATES)


async def _dbapi_error(request: Request, exc: Exception) -> JSONResponse:
    if is_transient_db_error(exc):
        return await _database_error(request, exc)
    return await _unhandled(request, exc)


Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]

# The handlers by the exception they render; the most specific class of an exception wins.
HANDLERS: dict[type[Exception], Handler] = {
    AppError: _app_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    PoolTimeoutError: _database_error,
    OperationalError: _database_error,
    OSError: _database_error,
    DBAPIError: _dbapi_error,
}


def handler_for(exc: Exception) -> Handler | None:
    """The handler that renders `exc`, as Starlette's ExceptionMiddleware finds it; None for
    what only the catch-all renders (a 500, from ServerErrorMiddleware)."""
    for cls in type(exc).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def install_error_handlers(app: FastAPI) -> None:
    for exc_class, handler in HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    app.add_exception_handler(Exception, _unhandled)
