"""Bodies of the send-message endpoint and the payloads of its SSE events."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field, field_validator

from chatbot_api.conversations.schemas import RequestModel, Usage, check_text


class SendMessage(RequestModel):
    message: str = Field(
        ..., min_length=1, description="The new user message. The server adds the history."
    )
    stream: bool = Field(False, description="Answer with text/event-stream instead of JSON.")
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A model from the server's allowlist (`LLM_ALLOWED_MODELS`); 403 otherwise. "
        "Default: the server's model.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on the reply's tokens; clamped to the server's maximum."
    )

    @field_validator("message")
    @classmethod
    def _check_message(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or whitespace only")
        return check_text(value)


class TurnIds(BaseModel):
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID


class MessageCreated(TurnIds):
    model_used: str


class ChatResponse(TurnIds):
    """The non-streaming answer, and the data of the `message.completed` event."""

    response: str
    model_used: str
    status: str
    finish_reason: str | None
    usage: Usage | None
    attempts: int = Field(1, description="Upstream calls made for this reply (retries).")
    fallbacks: int = Field(0, description="Providers of the fallback chain skipped.")


class TurnError(TurnIds):
    """The data of `message.incomplete` and `message.failed`: the error envelope plus ids and
    whatever partial text was stored."""

    error: dict[str, Any]
    status: str
    partial_response: str = ""
    model_used: str
