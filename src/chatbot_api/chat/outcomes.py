"""The events of a turn and how a reply's final state is told to the client: one function
builds the terminal event from what the turn ended with, whether it is still in memory or
read back from the database (resume, idempotent replay)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from chatbot_api.chat.schemas import ChatResponse, MessageCreated, TurnError
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.conversations.schemas import Usage as UsageOut
from chatbot_api.errors import AppError, UpstreamError
from chatbot_api.llm.base import Usage

CREATED = "message.created"
DELTA = "message.delta"
COMPLETED = "message.completed"
INCOMPLETE = "message.incomplete"
FAILED = "message.failed"
TERMINAL = frozenset({COMPLETED, INCOMPLETE, FAILED})


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """One event of a turn other than a delta. `offset` is how many characters of the reply
    the client has once it has seen this event: it is the SSE `id:`, so `Last-Event-ID` says
    where to resume."""

    name: str
    data: MessageCreated | ChatResponse | TurnError
    offset: int


# An entry of a turn's log: an event, or a delta kept as its bare text. A delta's offset (its
# SSE `id:`) is the length of the reply up to and including it, which a reader sums as it goes:
# per token the log holds the text alone, not an event object and an offset beside it.
LogEntry = TurnEvent | str


@dataclass(frozen=True, slots=True)
class TurnIds:
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID

    def as_dict(self) -> dict[str, uuid.UUID]:
        return {
            "conversation_id": self.conversation_id,
            "user_message_id": self.user_message_id,
            "assistant_message_id": self.assistant_message_id,
        }


def usage_dict(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def stored_error(error: AppError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"code": error.code, "message": error.message, "status": error.status_code}


def error_from_stored(stored: dict[str, Any] | None) -> AppError:
    """The AppError a stored reply's `error` column describes."""
    stored = stored or {}
    status = int(stored.get("status", 502))
    return UpstreamError(
        status,
        str(stored.get("code", "upstream_error")),
        str(stored.get("message", "The reply failed.")),
        {"Retry-After": "1"} if status == 503 else {},
    )


def terminal_event(
    ids: TurnIds,
    *,
    text: str,
    status: MessageStatus,
    model_used: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
    error: dict[str, Any] | None,
    attempts: int = 1,
    fallbacks: int = 0,
) -> TurnEvent:
    """`message.completed` for a completed reply, else `message.incomplete` (some text was
    kept: incomplete or cancelled) or `message.failed`."""
    if status is MessageStatus.COMPLETED:
        return TurnEvent(
            COMPLETED,
            ChatResponse(
                **ids.as_dict(),
                response=text,
                model_used=model_used,
                status=status,
                finish_reason=finish_reason,
                usage=UsageOut(**usage) if usage else None,
                attempts=attempts,
                fallbacks=fallbacks,
            ),
            len(text),
        )
    name = FAILED if status is MessageStatus.FAILED else INCOMPLETE
    return TurnEvent(
        name,
        TurnError(
            **ids.as_dict(),
            error=error or {},
            status=status,
            partial_response=text,
            model_used=model_used,
        ),
        len(text),
    )


def created_event(ids: TurnIds, model_used: str) -> TurnEvent:
    return TurnEvent(CREATED, MessageCreated(**ids.as_dict(), model_used=model_used), 0)
