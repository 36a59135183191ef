"""The hot routes served ahead of FastAPI's routing: `FastRoutes`, an ASGI middleware.

Sending a message and creating a conversation are the hot paths, and FastAPI's request path
costs more CPU per request than anything in them but the database and the provider: the
exception, exit-stack and routing middleware, matching the path against every route, two exit
stacks per request, and solving the route's dependencies. A stream also keeps every frame of
that chain alive for as long as it runs. This middleware serves a well-formed request to
either route itself, and calls the same endpoint (`chat.router.send_message`,
`conversations.router.create_conversation`) with its dependencies resolved by hand: the caller
(`current_principal`), then what the endpoint needs from the lifespan. Everything else goes on
to FastAPI, which therefore still decides, exactly as before:

- a body that is not `application/json` (an empty one is no body, as FastAPI reads it), or
  that the route's model refuses (422, with FastAPI's own error locations);
- an `Idempotency-Key` header that is empty, too long or sent twice;
- any other method or path, a `root_path`, and every request while FastAPI's native
  OpenTelemetry is configured (its spans name the route, so it must route the request).

A request passed on gets its body back (the messages read are replayed), and nothing has been
counted against its limits, since the caller is only identified once the request is kept.

Errors raised while serving are rendered by the app's own exception handlers
(`errors.handler_for`), as ExceptionMiddleware would. What has no handler of its own goes up
to Starlette's ServerErrorMiddleware, as before: a 500 in the envelope, logged.

The routes stay declared in their routers, so the OpenAPI document does not change.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot_api.auth.dependencies import Caller, bearer, current_principal
from chatbot_api.chat.dependencies import chat_for
from chatbot_api.chat.router import IDEMPOTENCY_KEY_MAX_LENGTH, send_message
from chatbot_api.chat.schemas import SendMessage
from chatbot_api.conversations.router import create_conversation
from chatbot_api.conversations.schemas import ConversationCreate
from chatbot_api.errors import handler_for


@dataclass(frozen=True, slots=True)
class Target:
    """A request this middleware serves: its route, what the path names, its key."""

    route: FastRoute
    path_id: str
    idempotency_key: str | None
    json: bool


Serve = Callable[[Request, Caller, Target, BaseModel | None], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class FastRoute:
    path: re.Pattern[str]
    body: type[BaseModel]
    body_optional: bool
    serve: Serve


async def _send(
    request: Request, caller: Caller, target: Target, body: BaseModel | None
) -> Response:
    assert isinstance(body, SendMessage)
    chat = chat_for(request, caller)
    response = await send_message(target.path_id, body, request, chat, target.idempotency_key)
    assert isinstance(response, Response)
    return response


async def _create(
    request: Request, caller: Caller, _target: Target, body: BaseModel | None
) -> Response:
    assert body is None or isinstance(body, ConversationCreate)
    return await create_conversation(request.app.state.engine, caller, body)


ROUTES = (
    FastRoute(re.compile(r"/api/v1/conversations/([^/]+)/messages"), SendMessage, False, _send),
    FastRoute(re.compile(r"/api/v1/conversations()"), ConversationCreate, True, _create),
)


def _is_json(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def _target(scope: Scope) -> Target | None:
    """The route and what the path and headers say, for a request decided here; None for a
    request to pass on, decided from the scope alone (the body is still unread)."""
    if (
        scope["type"] != "http"
        or scope["method"] != "POST"
        or scope.get("root_path")
        or scope.get("fastapi.telemetry") is not None
    ):
        return None
    for route in ROUTES:
        path = route.path.fullmatch(scope["path"])
        if path is not None:
            break
    else:
        return None
    content_type = b""
    keys: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"idempotency-key":
            keys.append(value)
    if len(keys) > 1:
        return None
    key = keys[0].decode("latin-1") if keys else None
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH:
        return None
    return Target(route, path[1], key, _is_json(content_type))


def _parse(target: Target, raw: bytes) -> tuple[bool, BaseModel | None]:
    """Whether the request is kept, and its body. As FastAPI reads a body, an empty one is
    no body whatever its content type."""
    if not raw:
        return target.route.body_optional, None
    if not target.json:
        return False, None
    try:
        return True, target.route.body.model_validate_json(raw)
    except ValidationError:
        return False, None


class FastRoutes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = _target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        response = await self._answer(scope, receive, send, target)
        if response is not None:
            # Sent from this frame, not `_answer`'s: a stream then keeps none of the body,
            # the request or the caller alive while it runs.
            await response(scope, receive, send)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, target: Target
    ) -> Response | None:
        """The response to send, or None once the request was passed on (and answered)."""
        received: list[Message] = []
        raw = b""
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                # The client left mid-body: FastAPI handles that as for any other route.
                await self.app(scope, _replay(received, receive), send)
                return None
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        kept, body = _parse(target, raw)
        if not kept:
            await self.app(scope, _replay(received, receive), send)
            return None

        request = Request(scope, receive, send)
        try:
            caller = await current_principal(request, await bearer(request))
            return await target.route.serve(request, caller, target, body)
        except Exception as exc:
            handler = handler_for(exc)
            if handler is None:
                raise
            return await handler(request, exc)


def _replay(received: list[Message], receive: Receive) -> Receive:
    """`receive` that first gives back the messages already read."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def install(app: FastAPI) -> None:
    """Innermost of the user middleware: inside the body-size limit, CORS and the security
    headers, which therefore apply to these routes as to every other."""
    app.add_middleware(FastRoutes)
