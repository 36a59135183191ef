"""Conversation and message storage. Functions take the session (or, on the hot path, a
`sql.Tx`) first and never commit: the caller's unit of work does (`SessionDep` for requests,
`sql.run_transaction` for creation and turns)."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot_api.conversations.models import Conversation, Message
from chatbot_api.conversations.schemas import ConversationOut
from chatbot_api.db import new_id, utcnow
from chatbot_api.errors import InvalidRequest, NotFound
from chatbot_api.sql import Prepared, Tx

_UNSET: Any = object()
# Sequence numbers are 32-bit integers in the schema.
MAX_SEQ = 2**31


def _encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, n: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("`after` is not a valid cursor.") from None
    parts = raw.split("|")
    if len(parts) != n:
        raise InvalidRequest("`after` is not a valid cursor.")
    return parts


def conversation_not_found() -> NotFound:
    return NotFound("Conversation not found.")


_CREATE = Prepared(
    insert(cast(Table, Conversation.__table__)).values(
        id=bindparam("p_id"),
        owner_id=bindparam("p_owner"),
        title=bindparam("p_title"),
        system_prompt=bindparam("p_system_prompt"),
        metadata=bindparam("p_metadata"),
        next_seq=1,
        created_at=bindparam("p_now"),
        updated_at=bindparam("p_now"),
    )
)


async def create_conversation(
    tx: Tx,
    *,
    owner_id: uuid.UUID,
    title: str | None = None,
    system_prompt: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> ConversationOut:
    """One INSERT; what it stored is known without reading it back."""
    conversation = ConversationOut(
        id=new_id(),
        title=title,
        system_prompt=system_prompt,
        metadata=metadata,
        created_at=(now := utcnow()),
        updated_at=now,
    )
    await tx.run(
        _CREATE,
        {
            "p_id": conversation.id,
            "p_owner": owner_id,
            "p_title": title,
            "p_system_prompt": system_prompt,
            "p_metadata": metadata,
            "p_now": now,
        },
    )
    return conversation


async def get_conversation(
    session: AsyncSession, conversation_id: uuid.UUID, *, owner_id: uuid.UUID
) -> Conversation:
    """The conversation, if `owner_id` owns it; `NotFound` otherwise, the same error as for
    an id that does not exist, so a caller learns nothing about other callers' ids."""
    conversation = await session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.owner_id == owner_id
        )
    )
    if conversation is None:
        raise conversation_not_found()
    return conversation


async def list_conversations(
    session: AsyncSession, *, owner_id: uuid.UUID, limit: int, after: str | None
) -> tuple[Sequence[Conversation], str | None]:
    """The owner's conversations, newest first, keyset-paginated on (created_at, id)."""
    query = (
        select(Conversation)
        .where(Conversation.owner_id == owner_id)
        .order_by(Conversation.created_at.desc(), Conversation.id.desc())
    )
    if after is not None:
        created_raw, id_raw = _decode_cursor(after, 2)
        try:
            created_at, last_id = datetime.fromisoformat(created_raw), uuid.UUID(id_raw)
        except ValueError:
            raise InvalidRequest("`after` is not a valid cursor.") from None
        if created_at.tzinfo is None:
            raise InvalidRequest("`after` is not a valid cursor.")
        query = query.where(
            or_(
                Conversation.created_at < created_at,
                and_(Conversation.created_at == created_at, Conversation.id < last_id),
            )
        )
    rows = (await session.scalars(query.limit(limit + 1))).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], _encode_cursor(last.created_at.isoformat(), str(last.id))


async def update_conversation(
    session: AsyncSession,
    conversation: Conversation,
    *,
    title: str | None = _UNSET,
    system_prompt: str | None = _UNSET,
    metadata: dict[str, Any] | None = _UNSET,
) -> Conversation:
    """Change the fields that were given; `None` clears a field."""
    if title is not _UNSET:
        conversation.title = title
    if system_prompt is not _UNSET:
        conversation.system_prompt = system_prompt
    if metadata is not _UNSET:
        conversation.meta = metadata
    await session.flush()
    await session.refresh(conversation)
    return conversation


async def delete_conversation(session: AsyncSession, conversation: Conversation) -> None:
    """Delete the conversation and, explicitly, its messages (no reliance on ON DELETE
    CASCADE being enforced by the backend)."""
    await session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    await session.execute(delete(Conversation).where(Conversation.id == conversation.id))


async def list_messages(
    session: AsyncSession, conversation_id: uuid.UUID, *, limit: int, after: str | None
) -> tuple[Sequence[Message], str | None]:
    """Oldest first, keyset-paginated on the sequence number."""
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.seq)
    if after is not None:
        (seq_raw,) = _decode_cursor(after, 1)
        if not (seq_raw.isascii() and seq_raw.isdigit() and int(seq_raw) < MAX_SEQ):
            raise InvalidRequest("`after` is not a valid cursor.")
        query = query.where(Message.seq > int(seq_raw))
    rows = (await session.scalars(query.limit(limit + 1))).all()
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], _encode_cursor(str(rows[limit - 1].seq))


async def get_message(
    session: AsyncSession, conversation_id: uuid.UUID, message_id: uuid.UUID
) -> Message:
    message = await session.get(Message, message_id)
    if message is None or message.conversation_id != conversation_id:
        raise NotFound("Message not found.")
    return message
