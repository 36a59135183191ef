"""Bodies of the admin key endpoints. The secret appears in one response only: the one that
creates the key."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from chatbot_api.auth.models import KeyScope
from chatbot_api.auth.service import EXPIRES_IN_PATTERN
from chatbot_api.conversations.schemas import RequestModel

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[\w.@ -]+$"),
]
INT32 = 2**31 - 1


class KeyLimitsIn(RequestModel):
    """Per-key overrides of the server's defaults (`RATE_LIMIT_*`); omit one to keep it."""

    requests_per_minute: int | None = Field(None, ge=1, le=INT32)
    concurrent_streams: int | None = Field(None, ge=1, le=INT32)
    tokens_per_day: int | None = Field(None, ge=1, le=INT32)


class KeyCreate(RequestModel):
    name: Name = Field(description="What the key is for, e.g. `alice-laptop`.")
    user: Name | None = Field(
        None, description="The principal that owns the key (created if new). Default: `name`."
    )
    scope: KeyScope = KeyScope.USER
    expires_in: str | None = Field(
        None,
        pattern=EXPIRES_IN_PATTERN,
        description="Lifetime such as `30d`, `12h` or `45m`; none: never.",
    )
    limits: KeyLimitsIn = Field(default_factory=KeyLimitsIn)


class KeyLimitsOut(BaseModel):
    requests_per_minute: int | None
    concurrent_streams: int | None
    tokens_per_day: int | None


class KeyOut(BaseModel):
    id: uuid.UUID
    name: str
    user: str
    scope: KeyScope
    hint: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: KeyLimitsOut


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. It is shown here once and never again.")


class KeyList(BaseModel):
    data: list[KeyOut]
