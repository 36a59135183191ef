"""Request and response bodies. Request models forbid unknown fields, so a client can never
set server-owned fields (role, status, timestamps, sequence numbers)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")


def check_text(value: str) -> str:
    """Reject text that cannot be stored or sent upstream faithfully."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConversationCreate(RequestModel):
    title: str | None = Field(None, max_length=200)
    system_prompt: str | None = Field(None, max_length=32_000)
    metadata: dict[str, Any] | None = None

    @field_validator("title", "system_prompt")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value)


class ConversationUpdate(ConversationCreate):
    """PATCH body: only the fields present are changed; `null` clears a field."""


class ConversationOut(BaseModel):
    id: uuid.UUID
    title: str | None
    system_prompt: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MessageOut(BaseModel):
    id: uuid.UUID
    seq: int
    role: str
    content: str
    status: str
    created_at: datetime
    completed_at: datetime | None = None
    token_count: int
    model_used: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None
