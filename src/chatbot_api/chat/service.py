"""The storage side of a turn, in two short transactions with no connection held between them.

1. `begin_turn`: claim the conversation and allocate two sequence numbers in one conditional
   UPDATE, insert the user message plus the assistant placeholder (status `streaming`), and
   read as much recent history as fits the model's window. On PostgreSQL the claim, both
   messages and the first page of history are one statement (`statements.BEGIN_TURN`); a
   message too long for the window rolls all of it back.
2. `finish_turn`: store the reply's text, status, usage and finish reason, and release the
   claim, but only if this turn still holds it: one statement on PostgreSQL.

This is the hot path of the service, so it is SQLAlchemy Core, not ORM entities in a session:
the statements are built once, at import, in `chat.statements`, and run as `sql.Prepared`
(straight on asyncpg on PostgreSQL, see `chatbot_api.sql`). Functions take the transaction
first and never commit; `chat.turns` owns the transactions.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from chatbot_api.chat import statements
from chatbot_api.conversations import service as conversations
from chatbot_api.conversations.models import MessageRole, MessageStatus
from chatbot_api.db import new_id, utcnow
from chatbot_api.errors import ContextTooLong, ConversationBusy, IdempotencyConflict, NotFound
from chatbot_api.llm.base import ChatMessage, Usage
from chatbot_api.sql import Row, Tx

# The first history read usually covers the whole window; later ones widen geometrically.
FIRST_BATCH = 64
MAX_BATCH = 1024
# A conversation released between the claim and the busy check is claimed again.
CLAIM_ATTEMPTS = 3
# Tokens the chat template spends around the whole prompt (BOS, assistant header).
PROMPT_OVERHEAD = 8


# What lets every stored system prompt through BEGIN_TURN's guard (`octet_length` is int4).
ANY_PROMPT_BYTES = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Remember:
    """An Idempotency-Key to store with the turn it starts, for `ttl`."""

    request: IdempotentRequest
    ttl: timedelta


class NeedsTransaction(Exception):
    """`begin_turn(standalone=True)` could not tell that the system prompt fits without
    counting it, or could not store its Idempotency-Key (taken already, or a backend that
    cannot), and stored nothing: start the turn again inside a transaction."""


@dataclass(frozen=True, slots=True)
class StoredReply:
    """What a reader needs of a stored reply to rebuild its events."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int
    role: str
    content: str
    status: str
    model_used: str | None
    finish_reason: str | None
    usage: dict[str, int] | None
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """What the context builder needs to know of the model."""

    context_window: int
    reply_tokens: int
    per_message: int
    count: Callable[[str], int]
    # `Provider.max_tokens_per_byte`: `count(text) <= tokens_per_byte * bytes + 1`.
    tokens_per_byte: float


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
    tx: Tx,
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
    standalone: bool = False,
    remember: Remember | None = None,
    message_ids: tuple[uuid.UUID, uuid.UUID] | None = None,
    durable: bool = True,
) -> BegunTurn:
    """Claim the conversation and store the user message and the reply placeholder.

    Raises `NotFound` for an unknown conversation or one that `owner_id` does not own (the
    same error for both), `ConversationBusy` while another turn holds it, and `ContextTooLong`
    if the system prompt and the new message alone leave no room for the reply. Any of these
    rolls the transaction back, so nothing is stored.

    `standalone=True` is for running with no transaction around it (`run_transaction`'s
    `single_statement`): on PostgreSQL the turn then starts in one statement that commits on
    its own, so it only claims a conversation whose system prompt is known beforehand to fit
    (see `statements.BEGIN_TURN`). Otherwise, nothing is stored and `NeedsTransaction` is
    raised: the caller runs the turn's start again in a transaction. Elsewhere (SQLite) it
    changes nothing, since the statements run in a transaction all the same.

    `remember` (standalone only) stores an Idempotency-Key with the turn, in the same
    statement, where no row holds that key yet; otherwise, and wherever the backend cannot
    (SQLite), `NeedsTransaction` is raised with nothing stored, and the caller looks the key
    up in a transaction (`find_idempotent`, `remember_idempotent`).

    `message_ids` are the ids to give the user message and the reply, chosen by the caller
    so that it can take back a start whose outcome it does not know (`undo_start`).

    `durable=False` is for a start that nobody is told of before the reply is stored (a turn
    that is not streamed): on PostgreSQL its commit then does not wait for the WAL to reach
    the disk (`synchronous_commit` off for that transaction), about a third of a millisecond
    here. The reply's commit waits for the WAL up to its own record, so once the reply is
    stored the start is on disk too. Only a database crash before the start's WAL is written
    out (by the next commit that waits for the disk, or by the WAL writer within three
    `wal_writer_delay`s, 600 ms by default) can lose it, and then `finish_turn` finds no reply
    and the turn fails with `ReplyNotStored`: the client, told nothing yet, retries. A crash
    of this process loses nothing (the database server still has it).
    """
    if remember is not None and not (standalone and tx.combines_writes):
        raise NeedsTransaction()
    now = now or utcnow()
    user_id, assistant_id = message_ids or (new_id(), new_id())
    default_tokens = budget.count(default_system_prompt) + budget.per_message
    # The tokens left for the system prompt, with its per-message overhead.
    prompt_room = (
        budget.context_window
        - budget.reply_tokens
        - (PROMPT_OVERHEAD + text_tokens + budget.per_message)
    )
    if standalone:
        guard = {
            "p_default_fits": default_tokens <= prompt_room,
            "p_prompt_bytes": max(
                -1, math.floor((prompt_room - budget.per_message - 1) / budget.tokens_per_byte)
            ),
        }
    else:
        guard = {"p_default_fits": True, "p_prompt_bytes": ANY_PROMPT_BYTES}
    keyed = {}
    if remember is not None:
        keyed = {
            "p_key_id": new_id(),
            "p_scope": remember.request.scope,
            "p_key": remember.request.key,
            "p_hash": remember.request.request_hash,
            "p_expires": now + remember.ttl,
        }
    claim_seq, stored_prompt, first_page = await _claim(
        tx,
        {
            **guard,
            **keyed,
            "p_id": conversation_id,
            "p_owner": owner_id,
            "p_now": now,
            "p_until": now + lease,
            "p_limit": FIRST_BATCH,
            # What `BEGIN_TURN` inserts along with the claim (PostgreSQL).
            "p_user_id": user_id,
            "p_text": text,
            "p_text_tokens": text_tokens,
            "p_reply_id": assistant_id,
            "p_model": model_used,
            "p_commit": None if durable else "off",
        },
        now=now,
        standalone=standalone,
        keyed=remember is not None,
    )
    user_seq = claim_seq - 2
    system_prompt: str = stored_prompt or default_system_prompt

    # Counted before the claim for the default prompt: the guard relied on that count (a
    # calibration since then may count differently).
    system_tokens = (
        budget.count(system_prompt) + budget.per_message if stored_prompt else default_tokens
    )
    fixed = PROMPT_OVERHEAD + system_tokens + text_tokens + budget.per_message
    room = prompt_room - system_tokens
    if room < 0:
        raise ContextTooLong(
            f"The message needs about {text_tokens} tokens; with the system prompt and "
            f"{budget.reply_tokens} tokens kept for the reply it does not fit the model's "
            f"{budget.context_window}-token context window."
        )
    history, history_tokens = await _read_history(
        tx,
        conversation_id,
        before_seq=user_seq,
        room=room,
        per_message=budget.per_message,
        first_page=first_page,
    )
    if not tx.combines_writes:
        await tx.run_many(
            statements.INSERT_MESSAGE,
            [
                {
                    "p_id": user_id,
                    "p_conversation": conversation_id,
                    "p_seq": user_seq,
                    "p_role": MessageRole.USER.value,
                    "p_content": text,
                    "p_status": MessageStatus.COMPLETED.value,
                    "p_tokens": text_tokens,
                    "p_model": None,
                    "p_now": now,
                    "p_completed": now,
                },
                {
                    "p_id": assistant_id,
                    "p_conversation": conversation_id,
                    "p_seq": user_seq + 1,
                    "p_role": MessageRole.ASSISTANT.value,
                    "p_content": "",
                    "p_status": MessageStatus.STREAMING.value,
                    "p_tokens": 0,
                    "p_model": model_used,
                    "p_now": now,
                    "p_completed": None,
                },
            ],
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


async def undo_start(
    tx: Tx, *, conversation_id: uuid.UUID, message_ids: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """Take back what `begin_turn(standalone=True, message_ids=...)` stored, if it stored
    anything: for a start whose statement may or may not have committed. One statement, so
    running it again changes nothing. Only PostgreSQL runs a start on its own: elsewhere it
    ran in a transaction, which the failure rolled back."""
    if not tx.combines_writes:
        return
    await tx.run(
        statements.UNDO_START,
        {
            "p_conversation": conversation_id,
            "p_user_id": message_ids[0],
            "p_reply_id": message_ids[1],
        },
    )


async def _claim(
    tx: Tx, params: dict[str, Any], *, now: datetime, standalone: bool, keyed: bool
) -> tuple[int, str | None, Sequence[Row] | None]:
    """Take the conversation for this turn and allocate two sequence numbers, atomically.
    Returns the new `next_seq`, the conversation's system prompt and, where the backend runs
    `BEGIN_TURN` (both messages inserted and the first page of history read in the same
    statement), that page; elsewhere None, and nothing is inserted yet."""
    for _ in range(CLAIM_ATTEMPTS):
        if tx.combines_writes:
            statement = statements.BEGIN_KEYED_TURN if keyed else statements.BEGIN_TURN
            rows = await tx.all(statement, params)
            if rows:
                # The last column is `synchronous_commit`'s setting (`BEGIN_TURN`).
                page = [row[2:6] for row in rows if row[2] is not None]
                return rows[0][0], rows[0][1], page
            if keyed:
                # The key may be held already: the transaction replays that request, and
                # tells a busy or unknown conversation and a prompt too long apart.
                raise NeedsTransaction()
        else:
            claimed = await tx.first(statements.CLAIM, params)
            if claimed is not None:
                return claimed[0], claimed[1], None
        found = await tx.first(statements.BUSY_UNTIL, params)
        if found is None:
            raise conversations.conversation_not_found()
        busy_until: datetime | None = found[0]
        if busy_until is not None and busy_until >= now:
            raise ConversationBusy(
                retry_after=min(5.0, max(1.0, (busy_until - now).total_seconds()))
            )
        if standalone and tx.combines_writes:
            # Free, so the prompt's guard refused it (or it was released in between).
            raise NeedsTransaction()
        # Released between our UPDATE and this read: the conversation is free, claim again.
    raise ConversationBusy(retry_after=1.0)


async def _read_history(
    tx: Tx,
    conversation_id: uuid.UUID,
    *,
    before_seq: int,
    room: int,
    per_message: int,
    first_page: Sequence[Row] | None = None,
) -> tuple[list[ChatMessage], int]:
    """The most recent messages that fit in `room` tokens, oldest first.

    Reads newest-first and stops at the first message that does not fit. After the first
    batch (`first_page`, if the claim already read it), the next one is sized from the
    average cost seen so far, so the rows read stay close to what fits, however long the
    conversation is.
    """
    newest_first: list[ChatMessage] = []
    used = 0
    seen = 0
    batch = FIRST_BATCH
    cursor = before_seq
    assistant = MessageRole.ASSISTANT.value
    rows = first_page
    while True:
        if rows is None:
            rows = await tx.all(
                statements.HISTORY,
                {"p_conversation": conversation_id, "p_before": cursor, "p_limit": batch},
            )
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
        rows = None
        average = max(1.0, used / max(1, seen))
        batch = max(16, min(MAX_BATCH, int((room - used) / average * 1.2) + 8))


async def finish_turn(
    tx: Tx,
    *,
    turn: BegunTurn,
    content: str,
    status: MessageStatus,
    token_count: int,
    usage: Usage | None,
    finish_reason: str | None,
    error: dict[str, Any] | None,
    model_used: str,
) -> bool:
    """Store the reply and release the conversation, unless a later turn took it over after
    our claim expired (then its `next_seq` has moved on and the release is a no-op).

    False if the database lost the turn's start: the reply's row is gone while its
    conversation is not (a crash before a start committed without waiting for the disk
    reached it; see `begin_turn`'s `durable`). A reply whose conversation was deleted
    meanwhile has nothing to be stored in, as the client asked: True.

    One statement where the backend allows it (`Tx.combines_writes`), so the caller runs it
    as `single_statement`; the rare follow-up read needs no snapshot shared with it. Running
    it again changes nothing: a retry is always safe."""
    params = {
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
        "p_now": utcnow(),
        "p_conversation": turn.conversation_id,
        "p_claim": turn.claim_seq,
    }
    if tx.combines_writes:
        released = await tx.first(statements.FINISH_AND_RELEASE, params)
        # No row: no claim of ours, or no reply; the reply's UPDATE ran after the release.
        found = (
            bool(released[0])
            if released is not None
            else await tx.first(statements.REPLY_EXISTS, params) is not None
        )
    else:
        found = await tx.first(statements.FINISH, params) is not None
        if found:  # else the claim, if there is one, is not this turn's to release
            await tx.run(statements.RELEASE, params)
    if found:
        return True
    gone = {"p_id": turn.conversation_id}
    return await tx.first(statements.CONVERSATION_EXISTS, gone) is None


async def store_partials(tx: Tx, partials: Sequence[tuple[uuid.UUID, str]]) -> None:
    """Store the text so far of replies still `streaming`: (reply id, text) pairs, one
    round trip for all of them."""
    await tx.run_many(
        statements.STORE_PARTIAL,
        [{"p_id": reply_id, "p_content": text} for reply_id, text in partials],
    )


async def renew_claims(
    tx: Tx, claims: Collection[tuple[uuid.UUID, int]], *, lease: timedelta
) -> None:
    """Extend the claims of turns in progress: (conversation id, claim seq) pairs. A claim
    that a later turn has taken over (its seq moved on) is left alone."""
    until = utcnow() + lease
    await tx.run_many(
        statements.RENEW, [{"p_id": cid, "p_claim": seq, "p_until": until} for cid, seq in claims]
    )


async def cancel_requested(tx: Tx) -> set[uuid.UUID]:
    """Replies still generating that someone asked to cancel (in any process)."""
    return {row[0] for row in await tx.all(statements.CANCEL_REQUESTED)}


async def request_cancel(tx: Tx, *, reply_id: uuid.UUID) -> None:
    """Ask the process generating the reply to stop (it polls at each checkpoint)."""
    await tx.run(statements.REQUEST_CANCEL, {"p_id": reply_id, "p_now": utcnow()})


async def reap_orphans(conn: AsyncConnection, *, now: datetime | None = None) -> int:
    """Mark `streaming` replies whose turn can no longer finish as `incomplete`: their
    conversation's claim has lapsed (the process died), so nobody will ever store them."""
    now = now or utcnow()
    c, m, i = statements.conversations_t.c, statements.messages_t.c, statements.idempotency_t.c
    lapsed = select(c.id).where(or_(c.busy_until.is_(None), c.busy_until < now))
    result = await conn.execute(
        update(statements.messages_t)
        .where(m.status == MessageStatus.STREAMING, m.conversation_id.in_(lapsed))
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
    await conn.execute(delete(statements.idempotency_t).where(i.expires_at < now))
    return int(result.rowcount or 0)


async def load_stored_reply(tx: Tx, reply_id: uuid.UUID) -> StoredReply | None:
    row = await tx.first(statements.REPLY, {"p_id": reply_id})
    return None if row is None else StoredReply(*row)


async def load_reply(
    tx: Tx, conversation_id: uuid.UUID, message_id: uuid.UUID
) -> tuple[StoredReply, uuid.UUID]:
    """An assistant message of the conversation and the id of the user message it answers."""
    message = await load_stored_reply(tx, message_id)
    if (
        message is None
        or message.conversation_id != conversation_id
        or message.role != MessageRole.ASSISTANT
    ):
        raise NotFound("Message not found.")
    user = await tx.first(
        statements.USER_MESSAGE_ID, {"p_conversation": conversation_id, "p_seq": message.seq - 1}
    )
    return message, user[0] if user is not None else message.id


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    scope: str
    key: str
    request_hash: str


async def find_idempotent(tx: Tx, request: IdempotentRequest) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The (conversation id, reply id) of a live earlier request with this key;
    `IdempotencyConflict` if that request had a different body."""
    record = await tx.first(statements.IDEMPOTENT, {"p_scope": request.scope, "p_key": request.key})
    if record is None:
        return None
    record_id, request_hash, conversation_id, reply_id, expires_at = record
    if expires_at < utcnow():
        await tx.run(statements.FORGET_IDEMPOTENT, {"p_id": record_id})
        return None
    if request_hash != request.request_hash:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request body."
        )
    return conversation_id, reply_id


async def remember_idempotent(
    tx: Tx, request: IdempotentRequest, *, turn: BegunTurn, ttl: timedelta
) -> None:
    now = utcnow()
    await tx.run(
        statements.REMEMBER_IDEMPOTENT,
        {
            "p_id": new_id(),
            "p_scope": request.scope,
            "p_key": request.key,
            "p_hash": request.request_hash,
            "p_conversation": turn.conversation_id,
            "p_user_message": turn.user_message_id,
            "p_reply": turn.assistant_message_id,
            "p_now": now,
            "p_expires": now + ttl,
        },
    )
