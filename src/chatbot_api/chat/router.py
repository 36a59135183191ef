"""Send a message (JSON, or Server-Sent Events with `"stream": true` or
`Accept: text/event-stream`), resume a stream, cancel a generation. The event protocol is
documented in `chat.events`."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response

from chatbot_api.chat import events
from chatbot_api.chat.dependencies import ChatDep, MessageIdDep, TurnsDep
from chatbot_api.chat.schemas import ChatResponse, SendMessage, TurnError
from chatbot_api.chat.service import IdempotentRequest
from chatbot_api.conversations import service as conversations
from chatbot_api.conversations.dependencies import ConversationIdDep, conversation_uuid
from chatbot_api.conversations.router import message_out
from chatbot_api.conversations.schemas import MessageOut
from chatbot_api.db import SessionDep, model_response
from chatbot_api.errors import AppError, error_envelope

router = APIRouter(prefix="/api/v1/conversations", tags=["chat"])

STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
IDEMPOTENCY_KEY_MAX_LENGTH = 255


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "description": message,
        "content": {"application/json": {"example": error_envelope(code, message)}},
    }


# One event of the stream (Schemathesis and OpenAPI 3.2 read a stream's schema per event).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
}
SSE_200: dict[str, Any] = {
    "description": "A `text/event-stream` of turn events (see the README).",
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
}
SEND_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The reply as JSON, or a `text/event-stream` of turn events.",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
    404: _error("No such conversation.", "not_found"),
    409: _error("A reply is already being generated (see Retry-After).", "conversation_busy"),
    413: _error("The body is over the size limit.", "payload_too_large"),
    502: _error("The model's provider answered badly.", "upstream_bad_response"),
    503: _error("The provider or the database is unavailable.", "upstream_unavailable"),
    504: _error("The provider did not answer in time.", "upstream_timeout"),
}


def _wants_stream(body: SendMessage, request: Request) -> bool:
    return body.stream or "text/event-stream" in request.headers.get("accept", "")


def _request_hash(conversation_id: uuid.UUID, body: SendMessage) -> str:
    """What makes two sends "the same request" for an Idempotency-Key: the conversation and
    the body, but not whether the answer is streamed."""
    canonical = json.dumps(
        {"conversation_id": str(conversation_id), **body.model_dump(exclude={"stream"})},
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "/{conversation_id}/messages",
    response_model=ChatResponse,
    responses=SEND_RESPONSES,
    summary="Send a message and get the reply",
)
async def send_message(
    # Parsed here rather than by a dependency (one fewer to solve per request); the claim in
    # `chat.service.begin_turn` checks the owner in the same UPDATE (404 with the same body).
    conversation_id: Annotated[str, Path(description="The conversation's id.")],
    body: SendMessage,
    request: Request,
    chat: ChatDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
            description="Retries with the same key and body are answered once (24 h).",
        ),
    ] = None,
) -> ChatResponse | Response:
    """Store the message, build the context from the stored history and answer with the
    model's reply. The reply is stored before the response (or the terminal event) is sent."""
    cid = conversation_uuid(conversation_id)
    caller, turns, guard = chat.caller, chat.turns, chat.guard
    stream = _wants_stream(body, request)
    model, max_tokens = guard.generation(body.model, body.max_tokens)
    idempotency = (
        None
        if idempotency_key is None
        else IdempotentRequest(str(caller.principal_id), idempotency_key, _request_hash(cid, body))
    )
    turn = await guard.start(
        lambda: turns.start(
            cid,
            body.message,
            owner_id=caller.principal_id,
            model=model,
            max_tokens=max_tokens,
            idempotency=idempotency,
            attach_if_running=stream,
            # Told nothing before its reply is stored, a plain request's start need not wait
            # for the disk; a stream's `created` event names the stored message at once.
            durable_start=stream,
        )
    )
    if stream:
        return events.EventStream(turn, headers=STREAM_HEADERS)
    outcome = await turn.outcome()
    if isinstance(outcome.data, ChatResponse):
        return model_response(
            outcome.data,
            headers={
                "X-Upstream-Attempts": str(outcome.data.attempts),
                "X-Upstream-Fallbacks": str(outcome.data.fallbacks),
            },
        )
    assert isinstance(outcome.data, TurnError)
    error = turn.error or AppError("The reply failed.")
    error.details = [outcome.data.model_dump(mode="json", exclude={"error"})]
    raise error


@router.get(
    "/{conversation_id}/messages/{message_id}/stream",
    # Not `response_class=`: that makes FastAPI expect a generator
    # endpoint, and the 404 for an unknown reply must be decided before streaming starts.
    responses={200: SSE_200, 404: _error("No such reply.", "not_found")},
    summary="Resume (or replay) the event stream of a reply",
)
async def resume_stream(
    conversation_id: ConversationIdDep,
    message_id: MessageIdDep,
    turns: TurnsDep,
    last_event_id: Annotated[
        str | None,
        Header(description="The `id:` of the last event received: resume after it."),
    ] = None,
) -> events.EventStream:
    """The events the client missed, then the live tail; everything at once if the reply
    has finished. Works whichever server process is generating the reply."""
    turn = await turns.attach(conversation_id, message_id)
    have = events.parse_last_event_id(last_event_id)
    return events.EventStream(turn, have, headers=STREAM_HEADERS)


@router.post(
    "/{conversation_id}/messages/{message_id}/cancel",
    response_model=MessageOut,
    responses={404: _error("No such reply.", "not_found")},
    summary="Stop a generation in progress",
)
async def cancel_generation(
    conversation_id: ConversationIdDep,
    message_id: MessageIdDep,
    turns: TurnsDep,
    session: SessionDep,
) -> MessageOut:
    """Close the upstream call and store the partial reply as `cancelled`. Idempotent: a
    reply that already finished is returned unchanged."""
    await turns.cancel(conversation_id, message_id)
    return message_out(await conversations.get_message(session, conversation_id, message_id))
