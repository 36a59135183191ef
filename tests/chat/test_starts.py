"""New work under load (turns starting, API-key lookups): it queues for a place that leaves
one of the pool's connections free, never for all of the pool, so a turn that has its reply
can always store it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatbot_api.conversations.models import Conversation
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import lock_waiters, messages, send, upstream_called
from tests.conftest import client_for, create_conversation


async def lock_rows(blocker: AsyncConnection, conversations: list[str]) -> None:
    await blocker.execute(
        select(Conversation.id)
        .where(Conversation.id.in_([uuid.UUID(c) for c in conversations]))
        .with_for_update()
    )


async def reply_stored_while_others_wait(
    app: FastAPI,
    fake_llm: FakeLLM,
    engine: AsyncEngine,
    hold: Callable[[AsyncConnection, list[str]], Awaitable[object]],
) -> None:
    """A turn is waiting for its reply when another session, through `hold`, makes the next
    three sends wait with a connection each; the reply comes and must be stored at once."""
    async with client_for(app) as client:
        first = await create_conversation(client)
        others = [await create_conversation(client) for _ in range(3)]
        fake_llm.enqueue(Script(reply="stored at once", ttft=1.0))
        turn = asyncio.create_task(send(client, first, "hello"))
        await upstream_called(fake_llm)
        async with engine.connect() as blocker:
            await hold(blocker, others)
            waiting = [asyncio.create_task(send(client, c, "wait")) for c in others]
            await lock_waiters(engine, 1)
            assert not turn.done()  # its reply comes while the others wait
            response = await asyncio.wait_for(turn, timeout=5.0)
            assert response.status_code == 200
            assert response.json()["response"] == "stored at once"
            assert not any(w.done() for w in waiting)  # still held by the lock
            await blocker.rollback()
        assert [(await w).status_code for w in waiting] == [200, 200, 200]
        stored = await messages(client, first)
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "completed"),
            ("assistant", "completed"),
        ]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_reply_is_stored_while_turns_wait_to_start(
    app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
) -> None:
    # Two connections. Turns starting on conversations whose rows another session has
    # locked hold their connection until the lock goes: without the reserve, two of them
    # would take both, and the reply could not be stored until then.
    app = await app_factory(db={"pool_size": 2, "max_overflow": 0, "pool_timeout": 10.0})
    await reply_stored_while_others_wait(app, fake_llm, engine, lock_rows)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_reply_is_stored_while_key_lookups_wait(
    app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
) -> None:
    # Every request's API key is looked up in a transaction of its own. Another session
    # holds the keys table, so the lookups of the sends hold their connection until it lets
    # go: without the reserve, two of them would take both.
    app = await app_factory(db={"pool_size": 2, "max_overflow": 0, "pool_timeout": 10.0})
    assert app.state.settings.auth.mode == "enabled"

    async def lock_keys(blocker: AsyncConnection, _conversations: list[str]) -> None:
        await blocker.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))

    await reply_stored_while_others_wait(app, fake_llm, engine, lock_keys)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_turn_that_cannot_start_in_time_is_a_pool_timeout(
    app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
) -> None:
    app = await app_factory(db={"pool_size": 2, "max_overflow": 0, "pool_timeout": 0.5})
    async with client_for(app) as client:
        locked = [await create_conversation(client) for _ in range(2)]
        async with engine.connect() as blocker:
            await lock_rows(blocker, locked)
            held = asyncio.create_task(send(client, locked[0], "held"))
            await lock_waiters(engine, 1)  # the first turn has the one place
            refused = await send(client, locked[1], "refused")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "database_unavailable"
            await blocker.rollback()
        assert (await held).status_code == 200
        assert [m["role"] for m in await messages(client, locked[1])] == []
