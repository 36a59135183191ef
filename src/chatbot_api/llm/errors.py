"""Errors raised by providers. Foreign errors (`llm.http`'s, asyncio, pydantic, llama.cpp) are
mapped onto this tree at one boundary, `map_exception()`, so nothing above `llm/` ever
sees a transport-specific exception.

    ProviderError                      any failure of a provider call
    ├── ProviderUnavailable            cannot reach it, 5xx, overloaded            -> 503
    │   └── ProviderRateLimited        429 upstream; carries retry_after           -> 503
    ├── ProviderTimeout                connect / first token / idle / total        -> 504
    ├── ProviderBadResponse            malformed JSON or SSE, HTML error pages,
    │                                  in-band error chunks, unexpected status     -> 502
    ├── ProviderAuthError              401/403: the server's key is wrong          -> 502
    └── ProviderRequestRejected        400/404/413/422: upstream refused the call  -> 502

Each carries `retryable`: whether a new attempt before any text reached the client is safe
and may succeed (408, 409, 429, 5xx, connection errors, timeouts).
"""

from __future__ import annotations

import asyncio

import pydantic

from chatbot_api.llm import http


class ProviderError(Exception):
    """Base class. `message` is safe to show to clients: it never contains secrets."""

    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ProviderUnavailable(ProviderError):
    retryable = True


class ProviderRateLimited(ProviderUnavailable):
    def __init__(
        self, message: str, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ProviderTimeout(ProviderError):
    retryable = True


class ProviderBadResponse(ProviderError):
    pass


class ProviderAuthError(ProviderError):
    pass


class ProviderRequestRejected(ProviderError):
    pass


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form only; dates are rare upstream)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_for_status(status: int, detail: str, retry_after: float | None = None) -> ProviderError:
    """The error for a non-2xx upstream HTTP status. `detail` must already be secret-free."""
    message = (
        f"upstream returned HTTP {status}: {detail}"
        if detail
        else f"upstream returned HTTP {status}"
    )
    if status == 429:
        return ProviderRateLimited(message, status=status, retry_after=retry_after)
    if status in (401, 403):
        return ProviderAuthError("upstream rejected the server's credentials", status=status)
    if status in (408, 504):
        return ProviderTimeout(message, status=status)
    if status == 409 or status >= 500:
        return ProviderUnavailable(message, status=status)
    if 400 <= status < 500:
        return ProviderRequestRejected(message, status=status)
    return ProviderBadResponse(message, status=status)


def map_exception(exc: BaseException) -> ProviderError:
    """Map a foreign exception raised during a provider call onto the tree above."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProviderTimeout("upstream timed out")
    if isinstance(exc, http.ConnectError):
        # Refused, unreachable, a name that does not resolve, a failed TLS handshake.
        return ProviderUnavailable("cannot reach upstream")
    if isinstance(exc, http.ConnectionBroken):
        return ProviderUnavailable("upstream connection broke mid-response")
    if isinstance(exc, (http.BadResponse, pydantic.ValidationError, ValueError)):
        # UnicodeDecodeError is a ValueError.
        return ProviderBadResponse("upstream sent a malformed response")
    if isinstance(exc, OSError):
        return ProviderUnavailable(f"upstream request failed: {type(exc).__name__}")
    return ProviderError(f"provider failed: {type(exc).__name__}")
