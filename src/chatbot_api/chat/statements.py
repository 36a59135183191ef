"""The prepared SQL of a turn (`sql.Prepared`): every statement `chat.service` runs on the
hot path, built once at import with named parameters (`p_*`: SQLAlchemy reserves the column
names for VALUES and SET). See `chatbot_api.sql` for how they run."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.selectable import Select

from chatbot_api.conversations.models import (
    Conversation,
    IdempotencyKey,
    Message,
    MessageRole,
    MessageStatus,
)
from chatbot_api.sql import Prepared

# Statuses whose text the model saw or the user read: they belong in later context.
CONTEXT_STATUSES = (MessageStatus.COMPLETED, MessageStatus.INCOMPLETE, MessageStatus.CANCELLED)

conversations_t = cast(Table, Conversation.__table__)
messages_t = cast(Table, Message.__table__)
idempotency_t = cast(Table, IdempotencyKey.__table__)
_c, _m, _i = conversations_t.c, messages_t.c, idempotency_t.c

# Parameter names start with `p_`: SQLAlchemy reserves column names for VALUES / SET.
_claim = (
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
CLAIM = Prepared(_claim)
BUSY_UNTIL = Prepared(
    select(_c.busy_until).where(_c.id == bindparam("p_id"), _c.owner_id == bindparam("p_owner"))
)
# Not `in_()`: its list is expanded at execution, so the SQL would not be fixed.
_in_context = or_(*(_m.status == status for status in CONTEXT_STATUSES))
HISTORY = Prepared(
    select(_m.seq, _m.role, _m.content, _m.token_count)
    .where(
        _m.conversation_id == bindparam("p_conversation"),
        _m.seq < bindparam("p_before"),
        _in_context,
    )
    .order_by(_m.seq.desc())
    .limit(bindparam("p_limit"))
)
# Both rows of a turn, where `BEGIN_TURN` cannot be run (SQLite): one executemany, which
# SQLAlchemy's insertmanyvalues makes one statement.
INSERT_MESSAGE = Prepared(
    insert(messages_t).values(
        id=bindparam("p_id"),
        conversation_id=bindparam("p_conversation"),
        seq=bindparam("p_seq"),
        role=bindparam("p_role"),
        content=bindparam("p_content"),
        status=bindparam("p_status"),
        token_count=bindparam("p_tokens"),
        model_used=bindparam("p_model"),
        created_at=bindparam("p_now"),
        completed_at=bindparam("p_completed"),
    )
)


def _param(name: str, column: str) -> BindParameter[Any]:
    """A named parameter typed as the `messages` column it goes in (the SELECT of an INSERT
    gives PostgreSQL nothing to infer a parameter's type from)."""
    return bindparam(name, type_=_m[column].type)


def _constant(value: Any, column: str) -> BindParameter[Any]:
    return literal(value, type_=_m[column].type)


# A turn's start in one round trip where the backend runs writes inside a WITH (PostgreSQL;
# `sql.Tx.combines_writes`): the claim, both messages (numbered from the claim, as
# `INSERT_MESSAGE` would store them) and the first page of history. No row if the claim
# failed, and then nothing was inserted either; else one row per message read, at least one
# (its message columns NULL if there is none). The read sees the table as it was when the
# statement began, so not the two messages it inserts. It misses no earlier reply either: the
# claim only matches a conversation that is free in that same view, and a turn frees it in
# the statement that stores its reply (`FINISH_AND_RELEASE`, or RELEASE in FINISH's
# transaction). An UPDATE that waits for a row lock only ever takes a row that already
# matched in that view, so it cannot claim one that another turn freed meanwhile.
#
# Run on its own (no transaction around it), BEGIN_TURN commits before Python has counted the
# system prompt's tokens, so its claim also asks that the prompt leave room for the rest of
# the turn: the default prompt (NULL or empty) where `p_default_fits` (counted in Python
# beforehand), or a stored one of at most `p_prompt_bytes` (a bound from
# `Provider.max_tokens_per_byte`). Inside a transaction, which a prompt too long can still
# roll back, both let every prompt by.
#
# Its last column sets `synchronous_commit` for the statement's own transaction (`set_config`
# with is_local, in effect when it commits): `p_commit` 'off' where nothing of the start is
# acknowledged before the reply is stored (a turn that is not streamed), whose commit then
# does not wait for the WAL to reach the disk; NULL keeps the session's setting. The reply's
# commit waits for the WAL up to itself, the start's records included (`begin_turn`).
#
# With an Idempotency-Key, BEGIN_KEYED_TURN also stores the key with the turn it starts, and
# claims nothing while any row holds that key (live or expired: the caller then starts the
# turn in a transaction, which replays, refuses or forgets it). Two requests racing with one
# key: the second waits on the unique index for the first to commit, then fails whole.
_MESSAGE_COLUMNS = (
    "id",
    "conversation_id",
    "seq",
    "role",
    "content",
    "status",
    "token_count",
    "model_used",
    "created_at",
    "completed_at",
)
# An empty prompt stands for the default, as NULL does (`begin_turn`).
_own_prompt = func.nullif(_c.system_prompt, "")
_prompt_fits = or_(
    and_(_own_prompt.is_(None), bindparam("p_default_fits", type_=Boolean)),
    func.octet_length(_own_prompt) <= bindparam("p_prompt_bytes", type_=Integer),
)
_key_unused = ~(
    select(_i.id).where(_i.scope == bindparam("p_scope"), _i.key == bindparam("p_key")).exists()
)


def _begin_turn(*, keyed: bool) -> Select[Any]:
    """BEGIN_TURN, or with `keyed` BEGIN_KEYED_TURN (see the comment above)."""
    claimed = _claim.where(_prompt_fits, *((_key_unused,) if keyed else ())).cte("claimed")

    def message_row(seq_back: int, **columns: ColumnElement[Any]) -> Select[Any]:
        """One row of the turn's INSERT: in this conversation, created now, numbered
        `seq_back` below the claim's new `next_seq`, the rest of `_MESSAGE_COLUMNS` from
        `columns`."""
        values = {
            "conversation_id": _param("p_id", "conversation_id"),
            "seq": claimed.c.next_seq - seq_back,
            "created_at": _param("p_now", "created_at"),
            **columns,
        }
        return select(*(values[name] for name in _MESSAGE_COLUMNS)).select_from(claimed)

    user_row = message_row(
        2,
        id=_param("p_user_id", "id"),
        role=_constant(MessageRole.USER.value, "role"),
        content=_param("p_text", "content"),
        status=_constant(MessageStatus.COMPLETED.value, "status"),
        token_count=_param("p_text_tokens", "token_count"),
        model_used=_constant(None, "model_used"),
        completed_at=_param("p_now", "completed_at"),
    )
    reply_row = message_row(
        1,
        id=_param("p_reply_id", "id"),
        role=_constant(MessageRole.ASSISTANT.value, "role"),
        content=_constant("", "content"),
        status=_constant(MessageStatus.STREAMING.value, "status"),
        token_count=_constant(0, "token_count"),
        model_used=_param("p_model", "model_used"),
        completed_at=_constant(None, "completed_at"),
    )
    inserted = (
        insert(messages_t)
        .from_select(_MESSAGE_COLUMNS, union_all(user_row, reply_row))
        .cte("inserted")
    )
    recent = (
        select(_m.seq, _m.role, _m.content, _m.token_count)
        .where(
            _m.conversation_id == bindparam("p_id"),
            _m.seq < claimed.c.next_seq - 2,
            _in_context,
        )
        .order_by(_m.seq.desc())
        .limit(bindparam("p_limit"))
        .lateral("recent")
    )
    commit_mode = func.set_config(
        "synchronous_commit",
        func.coalesce(
            bindparam("p_commit", type_=Text), func.current_setting("synchronous_commit")
        ),
        True,
    )
    statement = (
        select(
            claimed.c.next_seq,
            claimed.c.system_prompt,
            recent.c.seq,
            recent.c.role,
            recent.c.content,
            recent.c.token_count,
            commit_mode.label("synchronous_commit"),
        )
        .select_from(claimed.outerjoin(recent, true()))
        .order_by(recent.c.seq.desc().nulls_last())
        .add_cte(inserted)
    )
    if not keyed:
        return statement
    key_row = select(
        bindparam("p_key_id", type_=_i.id.type),
        bindparam("p_scope", type_=_i.scope.type),
        bindparam("p_key", type_=_i.key.type),
        bindparam("p_hash", type_=_i.request_hash.type),
        _param("p_id", "conversation_id"),
        _param("p_user_id", "id"),
        _param("p_reply_id", "id"),
        _param("p_now", "created_at"),
        bindparam("p_expires", type_=_i.expires_at.type),
    ).select_from(claimed)
    remembered = (
        insert(idempotency_t)
        .from_select(
            (
                "id",
                "scope",
                "key",
                "request_hash",
                "conversation_id",
                "user_message_id",
                "assistant_message_id",
                "created_at",
                "expires_at",
            ),
            key_row,
        )
        .cte("remembered")
    )
    return statement.add_cte(remembered)


BEGIN_TURN = Prepared(_begin_turn(keyed=False))
BEGIN_KEYED_TURN = Prepared(_begin_turn(keyed=True))
# What a turn's start stored, taken back, where its outcome is unknown (its connection broke
# while it ran): both messages and the key, and the claim released with the two sequence
# numbers it took, if it is still that claim. A start that did not commit leaves nothing to
# match, and then this changes nothing.
_gone = (
    delete(messages_t)
    .where(
        _m.conversation_id == bindparam("p_conversation"),
        or_(_m.id == bindparam("p_user_id"), _m.id == bindparam("p_reply_id")),
    )
    .returning(_m.seq)
    .cte("gone")
)
_unkeyed = (
    delete(idempotency_t)
    .where(_i.assistant_message_id == bindparam("p_reply_id", type_=_i.assistant_message_id.type))
    .cte("unkeyed")
)
UNDO_START = Prepared(
    update(conversations_t)
    .where(
        _c.id == bindparam("p_conversation"),
        _c.next_seq == select(func.max(_gone.c.seq) + 1).scalar_subquery(),
    )
    .values(next_seq=_c.next_seq - 2, busy_until=None, updated_at=_c.updated_at)
    .add_cte(_unkeyed)
)
_finish = (
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
_release = (
    update(conversations_t)
    .where(_c.id == bindparam("p_conversation"), _c.next_seq == bindparam("p_claim"))
    .values(busy_until=None, updated_at=bindparam("p_now"))
)
# The reply's id, or no row if it is gone (`service.finish_turn`).
FINISH = Prepared(_finish.returning(_m.id))
RELEASE = Prepared(_release)
# Both in one statement where the backend takes writes in a WITH (PostgreSQL): one round trip
# and no BEGIN or COMMIT, atomic all the same (`sql.Tx.combines_writes`). The conversation is
# updated first and the reply after it, when RETURNING counts the replies stored (1; 0 only
# if the reply was deleted while the statement ran). No row where the claim is no longer this
# turn's, or the reply's row is not there: the release asks for it too (a plain read, which
# locks nothing), since a turn whose start the database lost (`service.begin_turn`'s
# `durable`) must not release the claim of a later turn that took the same sequence numbers.
# Then the WITH runs after the main statement, and `service.finish_turn` looks the reply up.
_finished = _finish.returning(_m.id).cte("finished")
FINISH_AND_RELEASE = Prepared(
    _release.where(select(_m.id).where(_m.id == bindparam("p_id")).exists()).returning(
        select(func.count()).select_from(_finished).scalar_subquery()
    )
)
REPLY_EXISTS = Prepared(select(_m.id).where(_m.id == bindparam("p_id")))
CONVERSATION_EXISTS = Prepared(select(_c.id).where(_c.id == bindparam("p_id")))
STORE_PARTIAL = Prepared(
    update(messages_t)
    .where(_m.id == bindparam("p_id"), _m.status == MessageStatus.STREAMING)
    .values(content=bindparam("p_content"))
)
RENEW = Prepared(
    update(conversations_t)
    .where(
        _c.id == bindparam("p_id"),
        _c.next_seq == bindparam("p_claim"),
        # A turn that finished (released) while the checkpoint was on its way stays released.
        _c.busy_until.is_not(None),
    )
    # A renewed lease is no change of the conversation: `updated_at` stays as it was.
    .values(busy_until=bindparam("p_until"), updated_at=_c.updated_at)
)
# Cancel requests are rare and replies in progress few: the status index finds them at once.
CANCEL_REQUESTED = Prepared(
    select(_m.id).where(_m.status == MessageStatus.STREAMING, _m.cancel_requested_at.is_not(None))
)
REQUEST_CANCEL = Prepared(
    update(messages_t)
    .where(_m.id == bindparam("p_id"), _m.status == MessageStatus.STREAMING)
    .values(cancel_requested_at=bindparam("p_now"))
)
REPLY = Prepared(
    select(
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
)
USER_MESSAGE_ID = Prepared(
    select(_m.id).where(
        _m.conversation_id == bindparam("p_conversation"), _m.seq == bindparam("p_seq")
    )
)
IDEMPOTENT = Prepared(
    select(
        _i.id, _i.request_hash, _i.conversation_id, _i.assistant_message_id, _i.expires_at
    ).where(_i.scope == bindparam("p_scope"), _i.key == bindparam("p_key"))
)
FORGET_IDEMPOTENT = Prepared(delete(idempotency_t).where(_i.id == bindparam("p_id")))
REMEMBER_IDEMPOTENT = Prepared(
    insert(idempotency_t).values(
        id=bindparam("p_id"),
        scope=bindparam("p_scope"),
        key=bindparam("p_key"),
        request_hash=bindparam("p_hash"),
        conversation_id=bindparam("p_conversation"),
        user_message_id=bindparam("p_user_message"),
        assistant_message_id=bindparam("p_reply"),
        created_at=bindparam("p_now"),
        expires_at=bindparam("p_expires"),
    )
)
