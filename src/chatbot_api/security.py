"""HTTP hardening: security headers on every response, CORS (off unless configured), and
redaction of anything that looks like a secret in the server's logs.

Headers, set unless the route already chose them:

    X-Content-Type-Options: nosniff
    X-Frame-Options: DENY
    Referrer-Policy: no-referrer
    Cache-Control: no-store                    API answers are per-caller: never cached
    Content-Security-Policy: default-src 'none'; frame-ancestors 'none'; ...
                                               everywhere but the docs pages, which load
                                               Swagger UI and ReDoc from a CDN
    x-ratelimit-*-requests                     the caller's per-minute budget, when the
                                               request was authenticated (auth.dependencies)

The middleware wraps the whole application, Starlette's error middleware included, so a 500
carries the headers too. CORS never allows credentials, so an origin is never echoed with
them: clients authenticate with a bearer key, not cookies.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot_api.auth.dependencies import RATELIMIT_STATE

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_PATHS = ("/docs", "/redoc")
BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
EXPOSED_HEADERS = [
    "Retry-After",
    *(
        f"x-ratelimit-{part}-{kind}"
        for kind in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    ),
]
BASE_HEADER_BYTES = tuple(
    (name.lower().encode("latin-1"), value.encode("latin-1"))
    for name, value in BASE_HEADERS.items()
)
API_HEADER_BYTES = (*BASE_HEADER_BYTES, (b"content-security-policy", API_CSP.encode("latin-1")))
CORS_HEADERS = ["Authorization", "Content-Type", "Accept", "Idempotency-Key", "Last-Event-ID"]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Created here so the request's `state` (where auth leaves the rate-limit headers) is
        # the same dict whatever copies of the scope the app makes.
        state: dict[str, Any] = scope.setdefault("state", {})
        docs = scope["path"].startswith(DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Raw header lists rather than `MutableHeaders`: this runs on every response.
                headers = message["headers"] = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                defaults = BASE_HEADER_BYTES if docs else API_HEADER_BYTES
                headers.extend(h for h in defaults if h[0] not in present)
                for name, value in state.get(RATELIMIT_STATE, {}).items():
                    key = name.encode("latin-1")
                    if key not in present:
                        headers.append((key, value.encode("latin-1")))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI, *, cors_origins: list[str]) -> None:
    """CORS inside, security headers outermost (around Starlette's error middleware too)."""
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=CORS_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    build = app.build_middleware_stack

    def build_with_headers() -> ASGIApp:
        return SecurityHeaders(build())

    # Starlette builds the stack on the first request; wrapping the builder puts the headers
    # outside ServerErrorMiddleware, which answers 500s without passing through user middleware.
    setattr(app, "build_middleware_stack", build_with_headers)  # noqa: B010


SECRET_PATTERNS = re.compile(
    r"(cbk_[0-9A-Za-z]{8,}|gsk_[0-9A-Za-z]{8,}|sk-[0-9A-Za-z_\-]{8,}|Bearer\s+[^\s\"',]+)"
)


def redact(text: str) -> str:
    return SECRET_PATTERNS.sub("[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record whose message holds something secret-shaped: uvicorn's access log
    prints query strings, and a client may have put a key in one (it is refused, but logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Idempotent: on uvicorn's loggers and on the root logger's handlers."""
    targets: list[logging.Filterer] = [
        logging.getLogger("uvicorn.access"),
        logging.getLogger("uvicorn.error"),
        *logging.getLogger().handlers,
    ]
    for target in targets:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())
