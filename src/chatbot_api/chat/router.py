"""Send a message: JSON by default, Server-Sent Events with `"stream": true` or
`Accept: text/event-stream` (the event protocol is documented in `chat.events`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse

from chatbot_api.chat import events
from chatbot_api.chat.dependencies import TurnsDep
from chatbot_api.chat.schemas import ChatResponse, SendMessage
from chatbot_api.conversations.dependencies import ConversationIdDep
from chatbot_api.errors import AppError, error_envelope

router = APIRouter(prefix="/api/v1/conversations", tags=["chat"])


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "description": message,
        "content": {"application/json": {"example": error_envelope(code, message)}},
    }


SEND_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The reply as JSON, or a `text/event-stream` of turn events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    404: _error(404, "not_found", "No such conversation."),
    409: _error(409, "conversation_busy", "A reply is already being generated (see Retry-After)."),
    413: _error(413, "payload_too_large", "The body is over the size limit."),
    502: _error(502, "upstream_bad_response", "The model's provider answered badly."),
    503: _error(503, "upstream_unavailable", "The provider or the database is unavailable."),
    504: _error(504, "upstream_timeout", "The provider did not answer in time."),
}


def _wants_stream(body: SendMessage, request: Request) -> bool:
    return body.stream or "text/event-stream" in request.headers.get("accept", "")


@router.post(
    "/{conversation_id}/messages",
    response_model=ChatResponse,
    responses=SEND_RESPONSES,
    summary="Send a message and get the reply",
)
async def send_message(
    conversation_id: ConversationIdDep, body: SendMessage, request: Request, turns: TurnsDep
) -> ChatResponse | Response:
    """Store the message, build the context from the stored history and answer with the
    model's reply. The reply is stored before the response (or the terminal event) is sent."""
    turn = await turns.start(conversation_id, body.message)
    if _wants_stream(body, request):
        return EventSourceResponse(
            events.sse_stream(turn),
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    outcome = await turn.outcome()
    if isinstance(outcome.data, ChatResponse):
        return outcome.data
    error = turn.error or AppError("The reply failed.")
    error.details = [outcome.data.model_dump(mode="json", exclude={"error"})]
    raise error
