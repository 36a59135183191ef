"""Principals (the users that own conversations) and their API keys.

Only an HMAC-SHA256 of a key is stored (`secret_hash`, unique: the lookup goes through it).
`hint` keeps the prefix and the first characters so a listing can tell keys apart without
revealing them. Keys are never deleted, only revoked, so "no key has ever been created"
is a reliable sign of a first start.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from chatbot_api.db import Base, new_id, utcnow

# Created by the migration: it owns the conversations stored before auth existed, and it is
# the single user of `AUTH_MODE=disabled`.
LOCAL_PRINCIPAL_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
LOCAL_PRINCIPAL_NAME = "local"


class KeyScope(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


class Principal(Base):
    __tablename__ = "principals"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    principal_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("principals.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    hint: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # Per-key limits; NULL means the server's default (`RATE_LIMIT_*`).
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    concurrent_streams: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(Integer)
