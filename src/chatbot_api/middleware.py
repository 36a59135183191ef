"""ASGI middleware that must see the raw request: the body-size limit.

A body over the limit gets 413 before it is all read: at once when `Content-Length` says so,
otherwise as soon as the bytes received pass the limit (chunked uploads). In the second case
the app is told the client went away, and whatever it tries to answer is dropped.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot_api.errors import error_envelope


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._body = json.dumps(
            error_envelope("payload_too_large", f"The request body is over {max_bytes} bytes.")
        ).encode()

    async def _reject(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break  # h11/httptools refuse such a request first; count the bytes anyway
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
                # The server stops reading at Content-Length: no need to count, nor to wrap
                # every message of the response (a stream's every token) on the way out.
                await self.app(scope, receive, send)
                return

        received = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
