"""The SSE protocol of a turn. Each event has an `event:` name, an `id:` (its index in the
turn, starting at 0) and a JSON `data:`:

    message.created     {conversation_id, user_message_id, assistant_message_id, model_used}
    message.delta       {"delta": "<text>"}       (zero or more; their concatenation is the
                                                   stored reply)
    then exactly one terminal event:
    message.completed   the same object as the non-streaming response
    message.incomplete  {"error": {code, message, status}, ids..., status, partial_response,
                         model_used}: the stream broke after some text; the partial text is
                         stored with status `incomplete`
    message.failed      the same shape: nothing usable was generated (status `failed`), or
                         the reply could not be stored (`reply_not_stored`)

While nothing happens, a `: ping` comment is sent every `KEEPALIVE` seconds so proxies keep
the connection open. The events map one to one onto the turn's log (`chat.turns`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from chatbot_api.chat.turns import Turn, TurnEvent

KEEPALIVE = 15.0


def encode(index: int, event: TurnEvent) -> bytes:
    return format_sse_event(data_str=event.data.model_dump_json(), event=event.name, id=str(index))


async def sse_stream(turn: Turn, start: int = 0) -> AsyncIterator[bytes]:
    """Encode the turn's events from `start` until the terminal one. Closing this iterator
    (the client went away) leaves the turn running."""
    index = start
    while True:
        try:
            async with asyncio.timeout(KEEPALIVE):
                await turn.wait_beyond(index)
        except TimeoutError:
            yield KEEPALIVE_COMMENT
            continue
        log = turn.log
        end = len(log)
        # Everything already in the log goes out in one write: under load this coalesces
        # deltas into fewer, larger frames without changing the text.
        chunk = b"".join(encode(i, log[i]) for i in range(index, end))
        yield chunk
        if turn.done and end == len(log):
            return
        index = end
