"""The send route served ahead of FastAPI's routing: `SendFastPath`, an ASGI middleware.

Sending a message is the hot path, and FastAPI's request path costs more CPU per send than
anything in it but the database and the provider: the exception, exit-stack and routing
middleware, matching the path against every route, two exit stacks per request, and solving
the route's dependencies. A stream also keeps every frame of that chain alive for as long as
it runs. This middleware serves a well-formed send itself and calls the same endpoint
(`router.send_message`), with its dependencies resolved by hand: the caller
(`current_principal`), then `ChatDep`. Everything else goes on to FastAPI, which therefore
still decides, exactly as before:

- a body that is not `application/json`, or that `SendMessage` refuses (422, with FastAPI's
  own error locations);
- an `Idempotency-Key` header that is empty, too long or sent twice;
- any other method or path, a `root_path`, and every request while FastAPI's native
  OpenTelemetry is configured (its spans name the route, so it must route the request).

A request passed on gets its body back (the messages read are replayed), and nothing has been
counted against its limits, since the caller is only identified once the request is kept.

Errors raised while serving are rendered by the app's own exception handlers
(`errors.handler_for`), as ExceptionMiddleware would. What has no handler of its own goes up
to Starlette's ServerErrorMiddleware, as before: a 500 in the envelope, logged.

The route stays declared in `chat.router`, so the OpenAPI document does not change.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot_api.auth.dependencies import bearer, current_principal
from chatbot_api.chat.dependencies import chat_for
from chatbot_api.chat.router import send_message
from chatbot_api.chat.schemas import SendMessage
from chatbot_api.errors import handler_for

SEND_PATH = re.compile(r"/api/v1/conversations/([^/]+)/messages")
IDEMPOTENCY_KEY_MAX = 255


def _is_json(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def _target(scope: Scope) -> tuple[str, str | None] | None:
    """The conversation id and the `Idempotency-Key` of a send decided here; None for a
    request to pass on, decided from the scope alone (the body is still unread)."""
    if (
        scope["type"] != "http"
        or scope["method"] != "POST"
        or scope.get("root_path")
        or scope.get("fastapi.telemetry") is not None
    ):
        return None
    path = SEND_PATH.fullmatch(scope["path"])
    if path is None:
        return None
    content_type = b""
    keys: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"idempotency-key":
            keys.append(value)
    if not _is_json(content_type) or len(keys) > 1:
        return None
    key = keys[0].decode("latin-1") if keys else None
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        return None
    return path[1], key


class SendFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = _target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        response = await self._answer(scope, receive, send, *target)
        if response is not None:
            # Sent from this frame, not `_answer`'s: a stream then keeps none of the body,
            # the request or the caller alive while it runs.
            await response(scope, receive, send)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        conversation_id: str,
        idempotency_key: str | None,
    ) -> Response | None:
        """The response to send, or None once the request was passed on (and answered)."""
        received: list[Message] = []
        body = b""
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                # The client left mid-body: FastAPI handles that as for any other route.
                await self.app(scope, _replay(received, receive), send)
                return None
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            payload = SendMessage.model_validate_json(body)
        except ValidationError:
            await self.app(scope, _replay(received, receive), send)
            return None

        request = Request(scope, receive, send)
        try:
            caller = await current_principal(request, await bearer(request))
            response = await send_message(
                conversation_id, payload, request, chat_for(request, caller), idempotency_key
            )
        except Exception as exc:
            handler = handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        assert isinstance(response, Response)
        return response


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
    headers, which therefore apply to this route as to every other."""
    app.add_middleware(SendFastPath)
