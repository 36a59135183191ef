"""The SSE protocol of a turn. Each event has an `event:` name, an `id:` and a JSON `data:`:

    message.created     {conversation_id, user_message_id, assistant_message_id, model_used}
    message.delta       {"delta": "<text>"}       (zero or more; their concatenation is the
                                                   stored reply)
    then exactly one terminal event:
    message.completed   the same object as the non-streaming response
    message.incomplete  {"error": {code, message, status}, ids..., status, partial_response,
                         model_used}: the stream broke after some text (status `incomplete`),
                         or the generation was cancelled (status `cancelled`)
    message.failed      the same shape: nothing usable was generated (status `failed`), or
                         the reply could not be stored (`reply_not_stored`)

The `id:` of an event is the number of characters of the reply a client has once it has seen
that event (0 for `message.created`). A client that lost its connection sends the last id it
saw as `Last-Event-ID` to `GET .../messages/{message_id}/stream` and gets exactly the text it
is missing, then the live tail (or the terminal event at once if the reply is finished): no
gap and no duplicate. Without `Last-Event-ID` the stream is replayed from the start.

While nothing happens, a `: ping` comment is sent every `KEEPALIVE` seconds so proxies keep
the connection open.

This is on the per-token path: a delta frame is formatted straight into bytes (its JSON by
pydantic-core), a reader waits on one future per wake-up rather than a timeout per wait, and
everything that reached the log while the reader was away goes out in one write. Under load
that coalesces deltas into fewer, larger frames without changing the text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from pydantic_core import to_json
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatbot_api.chat.outcomes import CREATED, DELTA, LogEntry, TurnEvent
from chatbot_api.chat.turn import Turn

KEEPALIVE = 15.0
KEEPALIVE_COMMENT = b": ping\n\n"
_DELTA = DELTA.encode()


def encode(event: TurnEvent) -> bytes:
    payload = event.data.model_dump_json().encode()
    return b"event: %s\ndata: %s\nid: %d\n\n" % (event.name.encode(), payload, event.offset)


def encode_delta(text: str, offset: int) -> bytes:
    """A `message.delta` frame: `offset` is the reply's length once the client has `text`."""
    return b"event: %s\ndata: %s\nid: %d\n\n" % (_DELTA, to_json({"delta": text}), offset)


def parse_last_event_id(value: str | None) -> int | None:
    """The character offset a client has; None (replay everything) when absent or garbled."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def frames(entries: Sequence[LogEntry], offset: int, have: int | None) -> tuple[list[bytes], int]:
    """The frames still needed by a client that has `have` characters of the reply (None: a
    replay from the start) of `entries`, a run of a turn's log whose text starts at `offset`;
    and the offset after the run. A resumed client gets no `message.created`, and of a delta
    only the part it lacks."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            start, offset = offset, offset + len(entry)
            if have is None or start >= have:
                out.append(encode_delta(entry, offset))
            elif offset > have:
                out.append(encode_delta(entry[have - start :], offset))
        elif have is None or entry.name != CREATED:
            out.append(encode(entry))
    return out, offset


class EventStream(Response):
    """The `text/event-stream` response of a turn: its events from `have` characters on.

    An ASGI response of its own rather than a `StreamingResponse`: under uvicorn (ASGI spec
    2.3) that one runs every stream in an anyio task group, with a second task listening
    for the disconnect. Here the listener is one plain task whose end stops the stream."""

    media_type = "text/event-stream"

    def __init__(
        self, turn: Turn, have: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        self.turn = turn
        self.have = have
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            async for chunk in sse_stream(self.turn, self.have, gone=gone):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


async def _disconnect(receive: Receive) -> None:
    """Return once the client has gone (any unread request body is drained first)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse_stream(
    turn: Turn, have: int | None = None, *, gone: asyncio.Future[Any] | None = None
) -> AsyncIterator[bytes]:
    """Encode the turn's events until the terminal one, skipping what the client `have`s, or
    until `gone` is done (the client went away). Either way a generating turn goes on."""
    loop = asyncio.get_running_loop()
    index = offset = 0
    ping_due = False
    waiter: asyncio.Future[None] | None = None
    timer: asyncio.TimerHandle | None = None

    def wake(*_: object) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def keepalive() -> None:
        nonlocal ping_due, timer
        ping_due = True
        wake()
        timer = loop.call_later(KEEPALIVE, keepalive)

    # One timer per stream, re-armed every KEEPALIVE seconds, instead of one per wait.
    timer = loop.call_later(KEEPALIVE, keepalive)
    if gone is not None:
        gone.add_done_callback(wake)
    try:
        while gone is None or not gone.done():
            log = turn.log
            end = len(log)
            if end > index:
                out, offset = frames(log[index:end], offset, have)
                if out:
                    yield b"".join(out)
                if turn.done:
                    return
                index = end
            elif ping_due:
                ping_due = False
                yield KEEPALIVE_COMMENT
            else:
                waiter = turn.waiter()
                await waiter
                waiter = None
    finally:
        if timer is not None:
            timer.cancel()
        if turn.begun is None and turn.task is not None and not turn.done:
            turn.task.cancel()  # a follower of another process's turn: nobody reads it now
