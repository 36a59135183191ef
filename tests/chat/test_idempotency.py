"""`Idempotency-Key` on send: a retried request is answered once; the provider is called once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.conversations.models import IdempotencyKey
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import lock_waiters, messages, parse_sse, send, upstream_called
from tests.conftest import client_for, create_conversation


async def _send(
    client: httpx.AsyncClient,
    conversation_id: str,
    message: str,
    key: str,
    *,
    stream: bool = False,
) -> httpx.Response:
    return await client.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        json={"message": message, "stream": stream},
        headers={"Idempotency-Key": key},
    )


class TestIdempotencyKey:
    async def test_retry_replays_the_original_reply_without_calling_the_provider(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="only once"))
        conversation_id = await create_conversation(client)

        first = await _send(client, conversation_id, "hello", "key-1")
        retry = await _send(client, conversation_id, "hello", "key-1")

        assert first.status_code == retry.status_code == 200
        assert retry.json()["response"] == "only once"
        assert retry.json()["assistant_message_id"] == first.json()["assistant_message_id"]
        assert len(fake_llm.requests) == 1
        assert len(await messages(client, conversation_id)) == 2

    async def test_same_key_with_another_body_is_422(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)
        await _send(client, conversation_id, "hello", "key-2")

        response = await _send(client, conversation_id, "something else", "key-2")

        assert response.status_code == 422
        assert response.json()["error"]["code"] == "idempotency_key_reused"
        assert len(fake_llm.requests) == 1

    async def test_same_key_while_the_first_is_in_flight_is_409(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="slow", ttft=0.5))
        conversation_id = await create_conversation(client)
        first = asyncio.create_task(_send(client, conversation_id, "hello", "key-3"))
        await upstream_called(fake_llm)

        second = await _send(client, conversation_id, "hello", "key-3")

        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_key_in_flight"
        assert "Retry-After" in second.headers
        assert (await first).status_code == 200
        assert len(fake_llm.requests) == 1

    async def test_streaming_retry_in_flight_reattaches_to_the_same_stream(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=("a ", "b ", "c ", "d"), token_delay=0.1))
        conversation_id = await create_conversation(client)
        first = asyncio.create_task(_send(client, conversation_id, "hello", "key-4", stream=True))
        await upstream_called(fake_llm)

        second = await _send(client, conversation_id, "hello", "key-4", stream=True)

        first_events, second_events = parse_sse((await first).text), parse_sse(second.text)
        assert second_events[-1].event == "message.completed"
        assert second_events[-1].data == first_events[-1].data
        assert second_events[-1].data["response"] == "a b c d"
        assert len(fake_llm.requests) == 1

    async def test_a_failed_request_replays_its_failure(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(status=503))
        conversation_id = await create_conversation(client)

        first = await _send(client, conversation_id, "hello", "key-5")
        retry = await _send(client, conversation_id, "hello", "key-5")

        assert first.status_code == retry.status_code == 503
        assert retry.json()["error"]["code"] == first.json()["error"]["code"]
        assert len(fake_llm.requests) == 1

    async def test_an_expired_key_is_a_new_request(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(reliability={"idempotency_ttl_seconds": 0.2})
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            await _send(client, conversation_id, "hello", "key-6")
            await asyncio.sleep(0.3)

            again = await _send(client, conversation_id, "hello", "key-6")

        assert again.status_code == 200
        assert len(fake_llm.requests) == 2

    async def test_keys_are_per_conversation_body(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        first_conversation = await create_conversation(client)
        second_conversation = await create_conversation(client)
        await _send(client, first_conversation, "hello", "key-7")

        other = await _send(client, second_conversation, "hello", "key-7")

        assert other.status_code == 422


async def keys_stored(engine: AsyncEngine, key: str) -> int:
    async with engine.connect() as connection:
        found = await connection.scalar(
            select(func.count()).select_from(IdempotencyKey).where(IdempotencyKey.key == key)
        )
    return int(found or 0)


class TestRacingRetries:
    """Retries sent at the same moment: on PostgreSQL the key is stored in the statement that
    claims the conversation, so whoever loses the claim finds the key, never a busy
    conversation without one."""

    async def test_simultaneous_retries_start_one_turn(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        fake_llm.default = Script(reply="only once", ttft=0.3)
        conversation_id = await create_conversation(client)

        answers = await asyncio.gather(
            *(_send(client, conversation_id, "hello", "key-race") for _ in range(8))
        )

        codes = [(a.status_code, a.json().get("error", {}).get("code")) for a in answers]
        assert (200, None) in codes
        assert set(codes) <= {(200, None), (409, "idempotency_key_in_flight")}, codes
        assert {a.json()["response"] for a in answers if a.status_code == 200} == {"only once"}
        assert len(fake_llm.requests) == 1
        assert len(await messages(client, conversation_id)) == 2
        assert await keys_stored(engine, "key-race") == 1

    async def test_one_key_raced_on_two_conversations_starts_one_turn(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        fake_llm.default = Script(reply="only once", ttft=0.3)
        first, second = await create_conversation(client), await create_conversation(client)

        answers = await asyncio.gather(
            _send(client, first, "hello", "key-two"), _send(client, second, "hello", "key-two")
        )

        codes = sorted((a.status_code, a.json().get("error", {}).get("code")) for a in answers)
        assert codes == [(200, None), (422, "idempotency_key_reused")], codes
        assert len(fake_llm.requests) == 1
        assert await keys_stored(engine, "key-two") == 1
        # The refused conversation holds nothing and is free (its claim was undone too).
        refused, kept = (first, second) if answers[0].status_code == 422 else (second, first)
        assert len(await messages(client, kept)) == 2
        assert await messages(client, refused) == []
        assert (await send(client, refused, "now without a key")).status_code == 200
        assert [m["seq"] for m in await messages(client, refused)] == [1, 2]

    @pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
    async def test_a_key_stored_while_the_statement_runs_fails_it_whole(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        # Deterministically what the race above may or may not hit: the one-statement start
        # inserts its key while another transaction holds the same key uncommitted, so it
        # waits on the unique index, then fails whole when that one commits.
        fake_llm.default = Script(reply="ok")
        first, second = await create_conversation(client), await create_conversation(client)
        await _send(client, first, "probe", "key-probe")
        async with engine.connect() as connection:
            scope = await connection.scalar(
                select(IdempotencyKey.scope).where(IdempotencyKey.key == "key-probe")
            )
        async with engine.connect() as holder:
            await holder.execute(
                insert(IdempotencyKey).values(
                    id=uuid.uuid4(),
                    scope=scope,
                    key="key-held",
                    request_hash="0" * 64,
                    conversation_id=uuid.UUID(first),
                    user_message_id=uuid.uuid4(),
                    assistant_message_id=uuid.uuid4(),
                    expires_at=datetime.now(UTC) + timedelta(hours=1),
                )
            )
            answer = asyncio.create_task(_send(client, second, "hello", "key-held"))
            await lock_waiters(engine, 1)
            await holder.commit()
        refused = await answer

        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "idempotency_key_reused"
        assert await messages(client, second) == []
        assert (await send(client, second, "now without a key")).status_code == 200
        assert [m["seq"] for m in await messages(client, second)] == [1, 2]
        assert len(fake_llm.requests) == 2
