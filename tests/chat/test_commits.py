"""When a turn's writes reach the disk, and what a reply does when its turn's start is gone.

A plain (not streamed) turn's start commits without waiting for the WAL to reach the disk:
nothing of it is acknowledged before its reply is stored, and the reply's commit waits for
the WAL up to itself. A database crash in between can lose the start, and the reply must then
be refused, not reported as stored (`lose_start` leaves what such a crash does)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.conversations.models import Conversation, Message
from chatbot_api.sql import Prepared, Tx, run_transaction
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import (
    begin_a_turn,
    finish,
    messages,
    parse_sse,
    send,
    send_stream,
    upstream_called,
)
from tests.chat.test_round_trips import quiet_app, record_sent
from tests.conftest import client_for, create_conversation

SETTING = Prepared(select(func.current_setting("synchronous_commit")))


async def setting_after_start(engine: AsyncEngine, *, durable: bool) -> str:
    seen: list[str] = []

    async def read(tx: Tx) -> None:
        row = await tx.first(SETTING)
        assert row is not None
        seen.append(row[0])

    await begin_a_turn(engine, durable=durable, then=read)
    return seen[0]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_only_a_start_told_to_nobody_commits_without_waiting_for_the_disk(
    engine: AsyncEngine,
) -> None:
    # The start's statement sets the setting for its own transaction, the one it commits in.
    assert await setting_after_start(engine, durable=False) == "off"
    assert await setting_after_start(engine, durable=True) == "on"
    # And only for it: the next transaction on the pool's connections has the session's.
    for _ in range(3):
        assert await run_transaction(engine, lambda tx: tx.first(SETTING)) == ("on",)


async def lose_start(engine: AsyncEngine, conversation_id: uuid.UUID) -> None:
    """What a database crash leaves of a start that had not reached the disk: its two
    messages gone, the conversation's claim and sequence numbers as they were before it."""
    async with engine.begin() as connection:
        await connection.execute(
            delete(Message).where(
                Message.conversation_id == conversation_id, Message.status == "streaming"
            )
        )
        user_seq = await connection.scalar(
            delete(Message)
            .where(Message.conversation_id == conversation_id, Message.role == "user")
            .returning(Message.seq)
        )
        await connection.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(next_seq=user_seq, busy_until=None)
        )


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_plain_send_starts_without_waiting_for_the_disk_and_a_stream_waits(
    app_factory: Callable[..., Any], fake_llm: FakeLLM
) -> None:
    app = await quiet_app(app_factory)
    async with client_for(app) as client:
        conversation_id = await create_conversation(client)
        sent = record_sent(app.state.engine)
        assert (await send(client, conversation_id, "plain")).status_code == 200
        _, streamed = await send_stream(client, conversation_id, "streamed")
        assert streamed[-1].event == "message.completed"

    plain_args, stream_args = (
        tuple(logged.args) for logged in sent if logged.query.startswith("WITH claimed")
    )
    assert "off" in plain_args  # `p_commit`
    assert "off" not in stream_args


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_whose_start_was_lost_is_refused_not_reported_stored(
    app: Any, fake_llm: FakeLLM, engine: AsyncEngine, stream: bool
) -> None:
    fake_llm.enqueue(Script(reply="never stored", ttft=0.5))
    async with client_for(app) as client:
        conversation_id = await create_conversation(client)
        sending = asyncio.create_task(
            client.post(
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"message": "hello", "stream": stream},
            )
        )
        await upstream_called(fake_llm)
        await lose_start(engine, uuid.UUID(conversation_id))
        response = await sending
        if stream:
            last = parse_sse(response.text)[-1]
            assert last.event == "message.failed"
            assert last.data["status"] == "failed"
            assert last.data["error"]["code"] == "reply_not_stored"
        else:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "reply_not_stored"
            assert "lost this turn's start" in response.json()["error"]["message"]
        assert await messages(client, conversation_id) == []
        # Nothing is left claimed: the client's retry goes through.
        fake_llm.enqueue(Script(reply="stored"))
        retried = await send(client, conversation_id, "hello")
        assert retried.status_code == 200, retried.text
        assert [m["content"] for m in await messages(client, conversation_id)] == [
            "hello",
            "stored",
        ]


async def test_a_reply_whose_conversation_was_deleted_is_still_answered(
    app: Any, fake_llm: FakeLLM
) -> None:
    # Its rows are gone as the client asked, not lost: the reply is not refused for that.
    fake_llm.enqueue(Script(reply="answered anyway", ttft=0.5))
    async with client_for(app) as client:
        conversation_id = await create_conversation(client)
        sending = asyncio.create_task(send(client, conversation_id, "hello"))
        await upstream_called(fake_llm)
        deleted = await client.delete(f"/api/v1/conversations/{conversation_id}")
        assert deleted.status_code == 204
        response = await sending
        assert response.status_code == 200, response.text
        assert response.json()["response"] == "answered anyway"
        gone = await client.get(f"/api/v1/conversations/{conversation_id}/messages")
        assert gone.status_code == 404


async def test_finishing_tells_a_reply_stored_from_one_whose_row_is_gone(
    engine: AsyncEngine,
) -> None:
    # A later turn took the conversation over (its claim lapsed): the release is a no-op,
    # and the reply is stored all the same.
    overtaken = await begin_a_turn(engine)
    async with engine.begin() as connection:
        await connection.execute(
            update(Conversation)
            .where(Conversation.id == overtaken.conversation_id)
            .values(next_seq=Conversation.next_seq + 2, busy_until=None)
        )
    assert await run_transaction(engine, functools.partial(finish, turn=overtaken)) is True
    async with engine.connect() as connection:
        status = await connection.scalar(
            select(Message.status).where(Message.id == overtaken.assistant_message_id)
        )
    assert status == "completed"

    # Its rows gone and its claim taken back (what a crash leaves): nothing to store it in.
    lost = await begin_a_turn(engine)
    await lose_start(engine, lost.conversation_id)
    assert await run_transaction(engine, functools.partial(finish, turn=lost)) is False
    # The claim still its own, the reply's row gone.
    orphaned = await begin_a_turn(engine)
    async with engine.begin() as connection:
        await connection.execute(delete(Message).where(Message.id == orphaned.assistant_message_id))
    assert await run_transaction(engine, functools.partial(finish, turn=orphaned)) is False
    # Still ours and rows there: stored.
    kept = await begin_a_turn(engine)
    assert await run_transaction(engine, functools.partial(finish, turn=kept)) is True


async def test_a_lost_start_does_not_release_the_claim_of_a_later_turn(
    engine: AsyncEngine,
) -> None:
    # After the crash the conversation is free again, and a later turn claims it with the
    # same sequence numbers before the lost turn's reply comes.
    lost = await begin_a_turn(engine)
    await lose_start(engine, lost.conversation_id)
    later = await begin_a_turn(engine, conversation_id=lost.conversation_id)
    assert later.claim_seq == lost.claim_seq

    assert await run_transaction(engine, functools.partial(finish, turn=lost)) is False
    async with engine.connect() as connection:
        busy_until = await connection.scalar(
            select(Conversation.busy_until).where(Conversation.id == lost.conversation_id)
        )
    assert busy_until is not None  # still the later turn's
    assert await run_transaction(engine, functools.partial(finish, turn=later)) is True
