"""Building the context: the window is respected, the system prompt and the new message are
always kept, and a very long conversation costs no more history reads than fit; and starting
a turn stores nothing when it fails (a prompt too long, a connection lost)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.chat import service
from chatbot_api.conversations.models import Conversation, Message
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages, send
from tests.conftest import client_for, count_rows, create_conversation

WINDOW = 4096
REPLY_ROOM = 512


async def _seed_history(engine: AsyncEngine, conversation_id: str, count: int) -> None:
    """`count` completed messages, alternating user/assistant, written straight to the DB."""
    now = datetime.now(UTC)
    cid = uuid.UUID(conversation_id)
    rows = [
        {
            "id": uuid.uuid4(),
            "conversation_id": cid,
            "seq": seq,
            "role": "user" if seq % 2 else "assistant",
            "content": f"message number {seq} about nothing in particular",
            "status": "completed",
            "token_count": 12,
            "created_at": now,
        }
        for seq in range(1, count + 1)
    ]
    async with engine.begin() as connection:
        for start in range(0, len(rows), 2000):
            await connection.execute(insert(Message), rows[start : start + 2000])
        await connection.execute(
            update(Conversation).where(Conversation.id == cid).values(next_seq=count + 1)
        )


def _history_limits(app: FastAPI) -> list[int]:
    """Record the LIMIT of every history read the app makes."""
    limits: list[int] = []

    def before(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM messages" in statement and "ORDER BY messages.seq DESC" in statement:
            values = list(params.values()) if isinstance(params, dict) else list(params)
            # The integer parameters are the seq cursor, then the LIMIT.
            ints = [v for v in values if type(v) is int]
            limits.append(ints[-1])

    event.listen(app.state.engine.sync_engine, "before_cursor_execute", before)
    return limits


class TestContextWindow:
    async def test_oldest_turns_are_dropped_and_system_and_new_message_kept(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"context_window": 600, "max_tokens": 200})
        fake_llm.default = Script(reply="short answer")
        async with client_for(app) as client:
            conversation_id = await create_conversation(client, system_prompt="Be brief.")
            for i in range(12):
                response = await send(client, conversation_id, f"turn {i}: " + "word " * 30)
                assert response.status_code == 200

            last = fake_llm.messages(len(fake_llm.requests) - 1)

        assert last[0] == {"role": "system", "content": "Be brief."}
        assert last[-1]["content"].startswith("turn 11:")
        history = last[1:-1]
        assert 0 < len(history) < 22
        # The history kept is the most recent, contiguous suffix.
        assert history[-1] == {"role": "assistant", "content": "short answer"}
        assert history[-2]["content"].startswith("turn 10:")
        kept_turns = [m["content"].split(":")[0] for m in history if m["role"] == "user"]
        expected = [f"turn {i}" for i in range(11 - len(kept_turns), 11)]
        assert kept_turns == expected

    async def test_message_that_cannot_fit_is_rejected_and_nothing_stored(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(llm={"context_window": 300, "max_tokens": 100})
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "lorem ipsum " * 200)

            assert response.status_code == 422
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert await count_rows(engine, "messages") == 0
            assert fake_llm.requests == []
            # The claim was rolled back with the messages: the conversation is free, and its
            # numbering starts where it would have without the refused message.
            fake_llm.default = Script(reply="ok")
            assert (await send(client, conversation_id, "short")).status_code == 200
            stored = await messages(client, conversation_id)
        assert [m["seq"] for m in stored] == [1, 2]


class TestLongConversation:
    async def test_ten_thousand_messages_read_only_what_fits(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(llm={"context_window": WINDOW, "max_tokens": REPLY_ROOM})
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            await _seed_history(engine, conversation_id, 10_000)
            limits = _history_limits(app)

            response = await send(client, conversation_id, "what did we talk about?")

            assert response.status_code == 200, response.text
            sent = fake_llm.messages(0)
            fit = len(sent) - 2
            assert 100 < fit < 400
            assert sent[-2]["content"].startswith("message number 10000 ")
            # Never more rows requested than fit, plus one first batch of slack.
            assert sum(limits) <= fit + 64 + 16, limits
            assert await count_rows(engine, "messages") == 10_002
            assert (await messages(client, conversation_id))[0]["seq"] == 1


async def _claim_state(engine: AsyncEngine, conversation_id: str) -> tuple[int, Any]:
    """The conversation's next sequence number and its claim."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(Conversation.next_seq, Conversation.busy_until).where(
                    Conversation.id == uuid.UUID(conversation_id)
                )
            )
        ).one()
    return row[0], row[1]


# 300 tokens, 100 of them for the reply: the estimate of the fake's provider then bounds a
# stored prompt that surely fits at about 35 bytes.
SMALL_WINDOW = {"context_window": 300, "max_tokens": 100}


class TestSystemPromptRoom:
    """On PostgreSQL a turn usually starts in one statement that commits on its own, before
    the system prompt's tokens are counted; it only claims a conversation whose prompt is known
    to fit, and any other prompt is counted inside a transaction. Either way the outcome is
    exact: a prompt that fits is used, one that does not is a 422 with nothing stored."""

    async def test_a_prompt_too_long_for_the_window_is_a_422_and_nothing_is_stored(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(llm=SMALL_WINDOW)
        async with client_for(app) as client:
            conversation_id = await create_conversation(client, system_prompt="Be brief. " * 100)
            before = await _claim_state(engine, conversation_id)

            response = await send(client, conversation_id, "hi")

        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert await count_rows(engine, "messages") == 0
        assert fake_llm.requests == []
        assert await _claim_state(engine, conversation_id) == before == (1, None)

    async def test_a_prompt_that_fits_but_is_over_the_size_bound_is_used(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(llm=SMALL_WINDOW)
        prompt = "Be brief. " * 10  # 100 bytes, about 30 tokens
        fake_llm.default = Script(reply="ok")
        async with client_for(app) as client:
            conversation_id = await create_conversation(client, system_prompt=prompt)
            first = await send(client, conversation_id, "hi")
            second = await send(client, conversation_id, "again")
            stored = await messages(client, conversation_id)

        assert first.status_code == second.status_code == 200, first.text
        assert fake_llm.messages(1) == [
            {"role": "system", "content": prompt},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ]
        assert [m["seq"] for m in stored] == [1, 2, 3, 4]
        assert await _claim_state(engine, conversation_id) == (5, None)

    async def test_a_default_prompt_too_long_refuses_only_the_conversations_that_use_it(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(llm=SMALL_WINDOW, default_system_prompt="Answer at length. " * 60)
        fake_llm.default = Script(reply="ok")
        async with client_for(app) as client:
            own = await create_conversation(client, system_prompt="Be brief.")
            default = await create_conversation(client)
            # An empty prompt stands for the default one.
            empty = await create_conversation(client, system_prompt="")

            fits = await send(client, own, "hi")
            refused = [await send(client, cid, "hi") for cid in (default, empty)]

            assert fits.status_code == 200, fits.text
            assert fake_llm.messages(0)[0] == {"role": "system", "content": "Be brief."}
            for response in refused:
                assert response.status_code == 422, response.text
                assert response.json()["error"]["code"] == "context_length_exceeded"
            assert await count_rows(engine, "messages") == 2
            for cid in (default, empty):
                assert await messages(client, cid) == []
                assert await _claim_state(engine, cid) == (1, None)


class TestStartWithUnknownOutcome:
    """A turn's start whose connection breaks while it runs (a database restart) may have
    committed or not; on PostgreSQL it runs on its own, so nothing rolls it back. It is taken
    back: the client gets 503 and nothing is stored, the conversation is free, and its key
    (if any) is not taken. Without that, the client's retry ran into its own start's claim
    (409 `conversation_busy`) until the lease lapsed."""

    @staticmethod
    def fail_after_the_start(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
        real = service.begin_turn

        async def committed_then_failed(tx: Any, **kwargs: Any) -> service.BegunTurn:
            await real(tx, **kwargs)
            raise error

        monkeypatch.setattr(service, "begin_turn", committed_then_failed)

    @pytest.mark.parametrize(
        ("error", "status", "code"),
        [
            (
                DBAPIError("BEGIN_TURN", None, OSError("lost"), connection_invalidated=True),
                503,
                "database_unavailable",
            ),
            # In-process, httpx raises what reaches the server's error middleware (a 500).
            (RuntimeError("a bug after the statement"), None, None),
        ],
        ids=["connection lost", "a bug"],
    )
    @pytest.mark.parametrize("key", [None, "key-lost"])
    async def test_a_start_that_failed_after_its_statement_is_taken_back(
        self,
        app_factory: Callable[..., Any],
        fake_llm: FakeLLM,
        engine: AsyncEngine,
        monkeypatch: pytest.MonkeyPatch,
        key: str | None,
        error: Exception,
        status: int | None,
        code: str | None,
    ) -> None:
        app = await app_factory()
        fake_llm.default = Script(reply="ok")
        headers = {} if key is None else {"Idempotency-Key": key}
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            path = f"/api/v1/conversations/{conversation_id}/messages"
            with monkeypatch.context() as patch:
                self.fail_after_the_start(patch, error)
                if status is None:
                    with pytest.raises(type(error)):
                        await client.post(path, json={"message": "hi"}, headers=headers)
                else:
                    failed = await client.post(path, json={"message": "hi"}, headers=headers)
                    assert failed.status_code == status, failed.text
                    assert failed.json()["error"]["code"] == code
            assert await messages(client, conversation_id) == []
            assert await _claim_state(engine, conversation_id) == (1, None)
            assert fake_llm.requests == []

            retried = await client.post(path, json={"message": "hi"}, headers=headers)
            assert retried.status_code == 200, retried.text
            assert [m["seq"] for m in await messages(client, conversation_id)] == [1, 2]
