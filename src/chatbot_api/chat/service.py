"""The storage side of a turn, in two short transactions with no connection held between them.

1. `begin_turn`: claim the conversation and allocate two sequence numbers in one conditional
   UPDATE, read as much recent history as fits the model's window, and insert the user message
   plus the assistant placeholder (status `streaming`) in one INSERT.
2. `finish_turn`: store the reply's text, status, usage and finish reason, and release the
   claim, but only if this turn still holds it.

This is the hot path of the service, so it is SQLAlchemy Core on a connection, not ORM entities
in a session: every statement below is built once, at import, with named parameters, so a call
only binds values (SQLAlchemy's compiled cache does the rest). Functions take the connection
first and never commit; `chat.turns` owns the transactions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, delete, insert, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

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

conversations_t = cast(Table, Conversation.__table__)
messages_t = cast(Table, Message.__table__)
idempotency_t = cast(Table, IdempotencyKey.__table__)
# A row of `_REPLY`: what a reader needs to rebuild the events of a reply.
StoredReply = Row[*tuple[Any, ...]]
_c, _m, _i = conversations_t.c, messages_t.c, idempotency_t.c

# Parameter names start with `p_`: SQLAlchemy reserves column names for VALUES / SET.
_CLAIM = (
    update(conversations_t)
    .where(
        _c.id == bindparam("p_id"),
        _c.owner_id == bindparam("p_owner"),
        or_(_c.busy_until.is_(None), _c.busy_until < bindparam("p_now")),
    )
    .values(
        next_seq=_c.next_seq + 2, busy_until=bindparam("p_until"), updated_at=bindparam("p_now")
    )
    .returning(_c.next_seq, _c.system_prompt)
)
_BUSY_UNTIL = select(_c.busy_until).where(
    _c.id == bindparam("p_id"), _c.owner_id == bindparam("p_owner")
)
_HISTORY = (
    select(_m.seq, _m.role, _m.content, _m.token_count)
    .where(
        _m.conversation_id == bindparam("p_conversation"),
        _m.seq < bindparam("p_before"),
        _m.status.in_(CONTEXT_STATUSES),
    )
    .order_by(_m.seq.desc())
    .limit(bindparam("p_limit"))
)


def _typed(name: str, column: str) -> Any:
    """A parameter typed as `column`: in a multi-row VALUES only the first row would be."""
    return bindparam(name, type_=messages_t.c[column].type)


# Both rows of a turn in one statement, one round trip.
_INSERT_PAIR = insert(messages_t).values(
    [
        {
            "id": _typed("p_user_id", "id"),
            "conversation_id": _typed("p_conversation", "conversation_id"),
            "seq": _typed("p_user_seq", "seq"),
            "role": MessageRole.USER.value,
            "content": _typed("p_text", "content"),
            "status": MessageStatus.COMPLETED.value,
            "token_count": _typed("p_tokens", "token_count"),
            "model_used": None,
            "created_at": _typed("p_now", "created_at"),
            "completed_at": _typed("p_now", "completed_at"),
        },
        {
            "id": _typed("p_reply_id", "id"),
            "conversation_id": _typed("p_conversation", "conversation_id"),
            "seq": _typed("p_reply_seq", "seq"),
            "role": MessageRole.ASSISTANT.value,
            "content": "",
            "status": MessageStatus.STREAMING.value,
            "token_count": 0,
            "model_used": _typed("p_model", "model_used"),
            "created_at": _typed("p_now", "created_at"),
            "completed_at": None,
        },
    ]
)

_FINISH = (
    update(messages_t)
    .where(_m.id == bindparam("p_id"))
    .values(
        content=bindparam("p_content"),
        status=bindparam("p_status"),
        token_count=bindparam("p_tokens"),
        usage=bindparam("p_usage", type_=_m.usage.type),
        finish_reason=bindparam("p_finish"),
        error=bindparam("p_error", type_=_m.error.type),
        model_used=bindparam("p_model"),
        completed_at=bindparam("p_now"),
    )
)
_RELEASE = (
    update(conversations_t)
    .where(_c.id == bindparam("p_id"), _c.next_seq == bindparam("p_claim"))
    .values(busy_until=None, updated_at=bindparam("p_now"))
)
_STORE_PARTIAL = (
    update(messages_t)
    .where(_m.id == bindparam("p_id"), _m.status == MessageStatus.STREAMING)
    .values(content=bindparam("p_content"))
)
_RENEW = (
    update(conversations_t)
    .where(tuple_(_c.id, _c.next_seq).in_(bindparam("p_claims", expanding=True)))
    .values(busy_until=bindparam("p_until"))
)
# Cancel requests are rare and replies in progress few: the status index finds them at once.
_CANCEL_REQUESTED = select(_m.id).where(
    _m.status == MessageStatus.STREAMING, _m.cancel_requested_at.is_not(None)
)
_REPLY = select(
    _m.id,
    _m.conversation_id,
    _m.seq,
    _m.role,
    _m.content,
    _m.status,
    _m.model_used,
    _m.finish_reason,
    _m.usage,
    _m.error,
).where(_m.id == bindparam("p_id"))
_USER_MESSAGE_ID = select(_m.id).where(
    _m.conversation_id == bindparam("p_conversation"), _m.seq == bindparam("p_seq")
)
_IDEMPOTENT = select(
    _i.id,
    _i.request_hash,
    _i.conversation_id,
    _i.assistant_message_id,
    _i.expires_at,
).where(_i.scope == bindparam("p_scope"), _i.key == bindparam("p_key"))


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
    conn: AsyncConnection,
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
    same error for both), `ConversationBusy` while another turn holds it, and `ContextTooLong`
    if the system prompt and the new message alone leave no room for the reply. Any of these
    rolls the transaction back, so nothing is stored.
    """
    now = now or utcnow()
    claimed = await _claim(conn, conversation_id, owner_id=owner_id, now=now, lease=lease)
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
        conn, conversation_id, before_seq=user_seq, room=room, per_message=budget.per_message
    )
    user_id, assistant_id = new_id(), new_id()
    await conn.execute(
        _INSERT_PAIR,
        {
            "p_user_id": user_id,
            "p_reply_id": assistant_id,
            "p_conversation": conversation_id,
            "p_user_seq": user_seq,
            "p_reply_seq": user_seq + 1,
            "p_text": text,
            "p_tokens": text_tokens,
            "p_model": model_used,
            "p_now": now,
        },
    )
    context = [ChatMessage("system", system_prompt), *history, ChatMessage("user", text)]
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
    conn: AsyncConnection,
    conversation_id: uuid.UUID,
    *,
    owner_id: uuid.UUID,
    now: datetime,
    lease: timedelta,
) -> Row[Any]:
    """Take the conversation for this turn and allocate two sequence numbers, atomically."""
    params = {"p_id": conversation_id, "p_owner": owner_id, "p_now": now, "p_until": now + lease}
    for _ in range(CLAIM_ATTEMPTS):
        claimed = (await conn.execute(_CLAIM, params)).first()
        if claimed is not None:
            return claimed
        found = (await conn.execute(_BUSY_UNTIL, params)).first()
        if found is None:
            raise conversations.conversation_not_found()
        busy_until: datetime | None = found.busy_until
        if busy_until is not None and busy_until >= now:
            raise ConversationBusy(
                retry_after=min(5.0, max(1.0, (busy_until - now).total_seconds()))
            )
        # Released between our UPDATE and this read: the conversation is free, claim again.
    raise ConversationBusy(retry_after=1.0)


async def _read_history(
    conn: AsyncConnection,
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
    assistant = MessageRole.ASSISTANT.value
    while True:
        rows = (
            await conn.execute(
                _HISTORY, {"p_conversation": conversation_id, "p_before": cursor, "p_limit": batch}
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
                    ChatMessage("assistant" if role == assistant else "user", content)
                )
                used += cost
        if len(rows) < batch:
            newest_first.reverse()
            return newest_first, used
        average = max(1.0, used / max(1, seen))
        batch = max(16, min(MAX_BATCH, int((room - used) / average * 1.2) + 8))


async def finish_turn(
    conn: AsyncConnection,
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
    await conn.execute(
        _FINISH,
        {
            "p_id": turn.assistant_message_id,
            "p_content": content,
            "p_status": status.value,
            "p_tokens": token_count,
            "p_usage": None
            if usage is None
            else {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            "p_finish": finish_reason,
            "p_error": error,
            "p_model": model_used,
            "p_now": now,
        },
    )
    await conn.execute(
        _RELEASE, {"p_id": turn.conversation_id, "p_claim": turn.claim_seq, "p_now": now}
    )


async def store_partials(conn: AsyncConnection, partials: Sequence[tuple[uuid.UUID, str]]) -> None:
    """Store the text so far of replies still `streaming`: (reply id, text) pairs, one
    statement for all of them."""
    if partials:
        await conn.execute(
            _STORE_PARTIAL, [{"p_id": reply_id, "p_content": text} for reply_id, text in partials]
        )


async def renew_claims(
    conn: AsyncConnection, claims: Collection[tuple[uuid.UUID, int]], *, lease: timedelta
) -> None:
    """Extend the claims of turns in progress: (conversation id, claim seq) pairs. A claim
    that a later turn has taken over (its seq moved on) is left alone."""
    if claims:
        await conn.execute(_RENEW, {"p_claims": list(claims), "p_until": utcnow() + lease})


async def cancel_requested(conn: AsyncConnection) -> set[uuid.UUID]:
    """Replies still generating that someone asked to cancel (in any process)."""
    return set((await conn.execute(_CANCEL_REQUESTED)).scalars())


async def request_cancel(conn: AsyncConnection, *, reply_id: uuid.UUID) -> None:
    """Ask the process generating the reply to stop (it polls at each checkpoint)."""
    await conn.execute(
        update(messages_t)
        .where(_m.id == reply_id, _m.status == MessageStatus.STREAMING)
        .values(cancel_requested_at=utcnow())
    )


async def reap_orphans(conn: AsyncConnection, *, now: datetime | None = None) -> int:
    """Mark `streaming` replies whose turn can no longer finish as `incomplete`: their
    conversation's claim has lapsed (the process died), so nobody will ever store them."""
    now = now or utcnow()
    lapsed = select(_c.id).where(or_(_c.busy_until.is_(None), _c.busy_until < now))
    result = await conn.execute(
        update(messages_t)
        .where(_m.status == MessageStatus.STREAMING, _m.conversation_id.in_(lapsed))
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
    )
    await conn.execute(delete(idempotency_t).where(_i.expires_at < now))
    return int(result.rowcount or 0)


async def load_stored_reply(conn: AsyncConnection, reply_id: uuid.UUID) -> StoredReply | None:
    """The stored state of a reply: content, status, model_used, finish_reason, usage, error."""
    return (await conn.execute(_REPLY, {"p_id": reply_id})).first()


async def load_reply(
    conn: AsyncConnection, conversation_id: uuid.UUID, message_id: uuid.UUID
) -> tuple[StoredReply, uuid.UUID]:
    """An assistant message of the conversation and the id of the user message it answers."""
    message = await load_stored_reply(conn, message_id)
    if (
        message is None
        or message.conversation_id != conversation_id
        or message.role != MessageRole.ASSISTANT
    ):
        raise NotFound("Message not found.")
    user_id = await conn.scalar(
        _USER_MESSAGE_ID, {"p_conversation": conversation_id, "p_seq": message.seq - 1}
    )
    return message, user_id or message.id


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    scope: str
    key: str
    request_hash: str


async def find_idempotent(
    conn: AsyncConnection, request: IdempotentRequest
) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The (conversation id, reply id) of a live earlier request with this key;
    `IdempotencyConflict` if that request had a different body."""
    record = (
        await conn.execute(_IDEMPOTENT, {"p_scope": request.scope, "p_key": request.key})
    ).first()
    if record is None:
        return None
    if record.expires_at < utcnow():
        await conn.execute(delete(idempotency_t).where(_i.id == record.id))
        return None
    if record.request_hash != request.request_hash:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request body."
        )
    return record.conversation_id, record.assistant_message_id


async def remember_idempotent(
    conn: AsyncConnection, request: IdempotentRequest, *, turn: BegunTurn, ttl: timedelta
) -> None:
    now = utcnow()
    await conn.execute(
        insert(idempotency_t).values(
            id=new_id(),
            scope=request.scope,
            key=request.key,
            request_hash=request.request_hash,
            conversation_id=turn.conversation_id,
            user_message_id=turn.user_message_id,
            assistant_message_id=turn.assistant_message_id,
            created_at=now,
            expires_at=now + ttl,
        )
    )
