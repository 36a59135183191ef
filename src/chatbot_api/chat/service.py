"""The storage side of a turn, in two short transactions with no connection held between them.

1. `begin_turn`: claim the conversation and allocate two sequence numbers in one conditional
   UPDATE, read as much recent history as fits the model's window, and insert the user message
   plus the assistant placeholder (status `streaming`).
2. `finish_turn`: store the reply's text, status, usage and finish reason, and release the
   claim, but only if this turn still holds it.

Functions take the session first and never commit; `chat.turns` owns the transactions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot_api.conversations import service as conversations
from chatbot_api.conversations.models import (
    Conversation,
    IdempotencyKey,
    Message,
    MessageRole,
    MessageStatus,
)
from chatbot_api.db import new_id, utcnow
from chatbot_api.errors import ContextTooLong, ConversationBusy, IdempotencyConflict, NotFound
from chatbot_api.llm.base import ChatMessage, Usage

# Statuses whose text the model saw or the user read: they belong in later context.
CONTEXT_STATUSES = (MessageStatus.COMPLETED, MessageStatus.INCOMPLETE, MessageStatus.CANCELLED)
# The first history read usually covers the whole window; later ones widen geometrically.
FIRST_BATCH = 64
MAX_BATCH = 1024
# A conversation released between the claim and the busy check is claimed again.
CLAIM_ATTEMPTS = 3
# Tokens the chat template spends around the whole prompt (BOS, assistant header).
PROMPT_OVERHEAD = 8


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """What the context builder needs to know of the model."""

    context_window: int
    reply_tokens: int
    per_message: int
    count: Callable[[str], int]


@dataclass(frozen=True, slots=True)
class BegunTurn:
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    claim_seq: int
    context: list[ChatMessage]
    prompt_tokens: int
    history_messages: int


async def begin_turn(
    session: AsyncSession,
    *,
    conversation_id: uuid.UUID,
    owner_id: uuid.UUID,
    text: str,
    text_tokens: int,
    budget: TokenBudget,
    default_system_prompt: str,
    model_used: str,
    lease: timedelta,
    now: datetime | None = None,
) -> BegunTurn:
    """Claim the conversation and store the user message and the reply placeholder.

    Raises `NotFound` for an unknown conversation or one that `owner_id` does not own (the
    same error for both), `ConversationBusy` while another turn
    holds it, and `ContextTooLong` if the system prompt and the new message alone leave no
    room for the reply. Any of these rolls the transaction back, so nothing is stored.
    """
    now = now or utcnow()
    claimed = await _claim(session, conversation_id, owner_id=owner_id, now=now, lease=lease)
    claim_seq: int = claimed.next_seq
    user_seq = claim_seq - 2
    system_prompt: str = claimed.system_prompt or default_system_prompt

    system_tokens = budget.count(system_prompt) + budget.per_message
    fixed = PROMPT_OVERHEAD + system_tokens + text_tokens + budget.per_message
    room = budget.context_window - budget.reply_tokens - fixed
    if room < 0:
        raise ContextTooLong(
            f"The message needs about {text_tokens} tokens; with the system prompt and "
            f"{budget.reply_tokens} tokens kept for the reply it does not fit the model's "
            f"{budget.context_window}-token context window."
        )
    history, history_tokens = await _read_history(
        session, conversation_id, before_seq=user_seq, room=room, per_message=budget.per_message
    )

    user_id, assistant_id = new_id(), new_id()
    await session.execute(
        insert(Message),
        [
            {
                "id": user_id,
                "conversation_id": conversation_id,
                "seq": user_seq,
                "role": MessageRole.USER,
                "content": text,
                "status": MessageStatus.COMPLETED,
                "token_count": text_tokens,
                "created_at": now,
                "completed_at": now,
            },
            {
                "id": assistant_id,
                "conversation_id": conversation_id,
                "seq": user_seq + 1,
                "role": MessageRole.ASSISTANT,
                "content": "",
                "status": MessageStatus.STREAMING,
                "token_count": 0,
                "model_used": model_used,
                "created_at": now,
            },
        ],
    )
    context = [
        ChatMessage("system", system_prompt),
        *history,
        ChatMessage("user", text),
    ]
    return BegunTurn(
        conversation_id=conversation_id,
        user_message_id=user_id,
        assistant_message_id=assistant_id,
        claim_seq=claim_seq,
        context=context,
        prompt_tokens=fixed + history_tokens,
        history_messages=len(history),
    )


async def _claim(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    owner_id: uuid.UUID,
    now: datetime,
    lease: timedelta,
) -> Row[int, str | None]:
    """Take the conversation for this turn and allocate two sequence numbers, atomically."""
    claim = (
        update(Conversation)
        .where(
            Conversation.id == conversation_id,
            Conversation.owner_id == owner_id,
            (Conversation.busy_until.is_(None)) | (Conversation.busy_until < now),
        )
        .values(next_seq=Conversation.next_seq + 2, busy_until=now + lease, updated_at=now)
        .returning(Conversation.next_seq, Conversation.system_prompt)
    )
    for _ in range(CLAIM_ATTEMPTS):
        claimed = (await session.execute(claim)).first()
        if claimed is not None:
            return claimed
        found = (
            await session.execute(
                select(Conversation.busy_until).where(
                    Conversation.id == conversation_id, Conversation.owner_id == owner_id
                )
            )
        ).first()
        if found is None:
            raise conversations.conversation_not_found()
        busy_until = found.busy_until
        if busy_until is not None and busy_until >= now:
            raise ConversationBusy(
                retry_after=min(5.0, max(1.0, (busy_until - now).total_seconds()))
            )
        # Released between our UPDATE and this read: the conversation is free, claim again.
    raise ConversationBusy(retry_after=1.0)


async def _read_history(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    before_seq: int,
    room: int,
    per_message: int,
) -> tuple[list[ChatMessage], int]:
    """The most recent messages that fit in `room` tokens, oldest first.

    Reads newest-first and stops at the first message that does not fit. After the first
    batch, the next one is sized from the average cost seen so far, so the rows read stay
    close to what fits, however long the conversation is.
    """
    newest_first: list[ChatMessage] = []
    used = 0
    seen = 0
    batch = FIRST_BATCH
    cursor = before_seq
    while True:
        rows = (
            await session.execute(
                select(Message.seq, Message.role, Message.content, Message.token_count)
                .where(
                    Message.conversation_id == conversation_id,
                    Message.seq < cursor,
                    Message.status.in_(CONTEXT_STATUSES),
                )
                .order_by(Message.seq.desc())
                .limit(batch)
            )
        ).all()
        for seq, role, content, tokens in rows:
            cost = tokens + per_message
            if used + cost > room:
                newest_first.reverse()
                return newest_first, used
            cursor = seq
            seen += 1
            if content:
                newest_first.append(
                    ChatMessage("assistant" if role == MessageRole.ASSISTANT else "user", content)
                )
                used += cost
        if len(rows) < batch:
            newest_first.reverse()
            return newest_first, used
        average = max(1.0, used / max(1, seen))
        batch = max(16, min(MAX_BATCH, int((room - used) / average * 1.2) + 8))


async def finish_turn(
    session: AsyncSession,
    *,
    turn: BegunTurn,
    content: str,
    status: MessageStatus,
    token_count: int,
    usage: Usage | None,
    finish_reason: str | None,
    error: dict[str, Any] | None,
    model_used: str,
) -> None:
    """Store the reply and release the conversation, unless a later turn took it over after
    our claim expired (then its `next_seq` has moved on and the release is a no-op)."""
    now = utcnow()
    await session.execute(
        update(Message)
        .where(Message.id == turn.assistant_message_id)
        .values(
            content=content,
            status=status,
            token_count=token_count,
            usage=None
            if usage is None
            else {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            finish_reason=finish_reason,
            error=error,
            model_used=model_used,
            completed_at=now,
        )
    )
    await session.execute(
        update(Conversation)
        .where(Conversation.id == turn.conversation_id, Conversation.next_seq == turn.claim_seq)
        .values(busy_until=None, updated_at=now)
    )


async def checkpoint(
    session: AsyncSession, *, turn: BegunTurn, content: str | None, lease: timedelta
) -> bool:
    """Store the partial reply (if `content` is given) and renew the claim on the
    conversation. Returns True when someone asked for the reply to be cancelled."""
    now = utcnow()
    if content is None:
        cancel_requested = await session.scalar(
            select(Message.cancel_requested_at).where(Message.id == turn.assistant_message_id)
        )
    else:
        cancel_requested = await session.scalar(
            update(Message)
            .where(
                Message.id == turn.assistant_message_id,
                Message.status == MessageStatus.STREAMING,
            )
            .values(content=content)
            .returning(Message.cancel_requested_at)
        )
    await session.execute(
        update(Conversation)
        .where(Conversation.id == turn.conversation_id, Conversation.next_seq == turn.claim_seq)
        .values(busy_until=now + lease)
    )
    return cancel_requested is not None


async def request_cancel(session: AsyncSession, *, message: Message) -> None:
    """Ask the process generating `message` to stop (it polls at each checkpoint)."""
    await session.execute(
        update(Message)
        .where(Message.id == message.id, Message.status == MessageStatus.STREAMING)
        .values(cancel_requested_at=utcnow())
    )


async def reap_orphans(session: AsyncSession, *, now: datetime | None = None) -> int:
    """Mark `streaming` replies whose turn can no longer finish as `incomplete`: their
    conversation's claim has lapsed (the process died), so nobody will ever store them."""
    now = now or utcnow()
    lapsed = select(Conversation.id).where(
        (Conversation.busy_until.is_(None)) | (Conversation.busy_until < now)
    )
    result = await session.execute(
        update(Message)
        .where(Message.status == MessageStatus.STREAMING, Message.conversation_id.in_(lapsed))
        .values(
            status=MessageStatus.INCOMPLETE,
            completed_at=now,
            finish_reason="interrupted",
            error={
                "code": "generation_interrupted",
                "message": "The server stopped before the reply was finished.",
                "status": 503,
            },
        )
        .execution_options(synchronize_session=False)
    )
    await session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < now))
    return int(getattr(result, "rowcount", 0) or 0)


async def load_reply(
    session: AsyncSession, conversation_id: uuid.UUID, message_id: uuid.UUID
) -> tuple[Message, uuid.UUID]:
    """An assistant message of the conversation and the id of the user message it answers."""
    message = await conversations.get_message(session, conversation_id, message_id)
    if message.role != MessageRole.ASSISTANT:
        raise NotFound("Message not found.")
    user_id = await session.scalar(
        select(Message.id).where(
            Message.conversation_id == conversation_id, Message.seq == message.seq - 1
        )
    )
    return message, user_id or message.id


async def find_idempotent(
    session: AsyncSession, *, scope: str, key: str, request_hash: str
) -> IdempotencyKey | None:
    """The live record of an earlier request with this key; `IdempotencyConflict` if that
    request had a different body."""
    record = await session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
    )
    if record is None:
        return None
    if record.expires_at < utcnow():
        await session.delete(record)
        await session.flush()
        return None
    if record.request_hash != request_hash:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request body."
        )
    return record


async def remember_idempotent(
    session: AsyncSession,
    *,
    scope: str,
    key: str,
    request_hash: str,
    turn: BegunTurn,
    ttl: timedelta,
) -> None:
    now = utcnow()
    session.add(
        IdempotencyKey(
            scope=scope,
            key=key,
            request_hash=request_hash,
            conversation_id=turn.conversation_id,
            user_message_id=turn.user_message_id,
            assistant_message_id=turn.assistant_message_id,
            created_at=now,
            expires_at=now + ttl,
        )
    )
    await session.flush()
