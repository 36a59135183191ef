"""The send-message endpoint against the fake OpenAI-compatible server, on both databases."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages, send, send_stream, upstream_called
from tests.conftest import FAKE_KEY, count_rows, create_conversation


class TestSendMessage:
    async def test_reply_has_the_original_spec_fields_and_ids(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="Hola Felipe, encantado."))
        conversation_id = await create_conversation(client)

        response = await send(client, conversation_id, "Hola, soy Felipe, desarrollador Python")

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["response"] == "Hola Felipe, encantado."
        assert body["model_used"] == "fake-model"
        assert body["finish_reason"] == "stop"
        assert body["status"] == "completed"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert body["conversation_id"] == conversation_id
        stored = await messages(client, conversation_id)
        assert [m["id"] for m in stored] == [
            body["user_message_id"],
            body["assistant_message_id"],
        ]

    async def test_second_turn_sees_first_turn(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="Nice to meet you, Felipe."))
        fake_llm.enqueue(Script(reply="You are from Santiago."))
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "Hi, I'm Felipe from Santiago")
        second = await send(client, conversation_id, "Where am I from?")

        assert second.json()["response"] == "You are from Santiago."
        sent = fake_llm.messages(1)
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
        assert sent[1]["content"] == "Hi, I'm Felipe from Santiago"
        assert sent[2]["content"] == "Nice to meet you, Felipe."
        assert sent[3]["content"] == "Where am I from?"

    async def test_provider_receives_model_key_and_reply_budget(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "hello")

        request = fake_llm.requests[0]
        assert request.body["model"] == "fake-model"
        assert request.body["max_tokens"] == 1024
        assert request.headers["Authorization"] == f"Bearer {FAKE_KEY}"

    async def test_default_system_prompt_asks_for_the_users_language(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "hola")

        system = fake_llm.messages(0)[0]
        assert system["role"] == "system"
        assert "language" in system["content"]

    async def test_conversation_system_prompt_replaces_the_default(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client, system_prompt="You are a pirate.")

        await send(client, conversation_id, "hello")

        assert fake_llm.messages(0)[0] == {"role": "system", "content": "You are a pirate."}

    async def test_reply_is_stored_with_usage_and_sequence(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="Stored reply."))
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "first")

        user, reply = await messages(client, conversation_id)
        assert (user["role"], user["status"], user["seq"]) == ("user", "completed", 1)
        assert (reply["role"], reply["status"], reply["seq"]) == ("assistant", "completed", 2)
        assert reply["content"] == "Stored reply."
        assert reply["model_used"] == "fake-model"
        assert reply["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] > 0
        assert reply["token_count"] == reply["usage"]["completion_tokens"]
        assert user["token_count"] > 0


class TestStreaming:
    async def test_events_arrive_in_protocol_order_and_deltas_equal_stored_reply(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=("Hel", "lo ", "wor", "ld ", "ñandú 🦜")))
        conversation_id = await create_conversation(client)

        response, events = await send_stream(client, conversation_id, "hi")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        names = [e.event for e in events]
        assert names[0] == "message.created"
        assert names[-1] == "message.completed"
        assert set(names[1:-1]) == {"message.delta"}
        text = "".join(e.data["delta"] for e in events[1:-1])
        # Each id is how many characters of the reply the client has after that event.
        offsets = [0, 3, 6, 9, 12, len(text), len(text)]
        assert [e.id for e in events] == [str(n) for n in offsets]
        assert text == "Hello world ñandú 🦜"
        stored = await messages(client, conversation_id)
        assert stored[1]["content"] == text

    async def test_completed_event_is_the_non_streaming_response(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="same shape"))
        conversation_id = await create_conversation(client)

        _, events = await send_stream(client, conversation_id, "hi")
        plain = await send(client, conversation_id, "again")

        completed = events[-1].data
        assert set(completed) == set(plain.json())
        assert completed["response"] == "same shape"
        assert events[0].data["assistant_message_id"] == completed["assistant_message_id"]

    async def test_accept_header_selects_streaming(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)

        response = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"message": "hi"},
            headers={"Accept": "text/event-stream"},
        )

        assert response.headers["content-type"].startswith("text/event-stream")
        assert "event: message.completed" in response.text


class TestBusyConversation:
    async def test_second_send_while_generating_gets_409_with_retry_after(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        fake_llm.enqueue(Script(reply="slow reply", ttft=0.5))
        conversation_id = await create_conversation(client)

        first = asyncio.create_task(send(client, conversation_id, "one"))
        await upstream_called(fake_llm)  # the first turn holds the conversation
        second = await send(client, conversation_id, "two")

        assert second.status_code == 409
        assert second.json()["error"]["code"] == "conversation_busy"
        assert int(second.headers["Retry-After"]) >= 1
        assert (await first).status_code == 200
        assert await count_rows(engine, "messages") == 2

    async def test_conversation_is_free_again_after_the_reply(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)

        statuses = [(await send(client, conversation_id, f"m{i}")).status_code for i in range(3)]

        assert statuses == [200, 200, 200]
        assert [m["seq"] for m in await messages(client, conversation_id)] == list(range(1, 7))

    async def test_concurrent_sends_never_interleave_or_duplicate(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.default = Script(reply="ok", ttft=0.05)
        conversation_id = await create_conversation(client)

        responses = await asyncio.gather(
            *(send(client, conversation_id, f"m{i}") for i in range(12))
        )

        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 409}
        assert codes.count(200) >= 1
        stored = await messages(client, conversation_id)
        assert len(stored) == 2 * codes.count(200)
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        assert [m["role"] for m in stored] == ["user", "assistant"] * codes.count(200)


class TestBadInput:
    async def _assert_rejected(
        self,
        client: httpx.AsyncClient,
        engine: AsyncEngine,
        fake_llm: FakeLLM,
        *,
        content: bytes,
        status: int = 422,
    ) -> dict[str, object]:
        conversation_id = await create_conversation(client)
        response = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == status, response.text
        assert await count_rows(engine, "messages") == 0
        assert fake_llm.requests == []
        error: dict[str, object] = response.json()["error"]
        return error

    async def test_empty_message(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        error = await self._assert_rejected(client, engine, fake_llm, content=b'{"message": ""}')
        assert error["code"] == "validation_error"

    async def test_whitespace_only_message(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        await self._assert_rejected(client, engine, fake_llm, content=b'{"message": " \\n\\t "}')

    async def test_message_over_the_character_limit(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        body = b'{"message": "' + b"a" * 32_001 + b'"}'
        await self._assert_rejected(client, engine, fake_llm, content=body)

    async def test_nul_character(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        await self._assert_rejected(client, engine, fake_llm, content=b'{"message": "a\\u0000b"}')

    async def test_lone_surrogate(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        await self._assert_rejected(client, engine, fake_llm, content=b'{"message": "a\\ud800b"}')

    async def test_invalid_json(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        await self._assert_rejected(client, engine, fake_llm, content=b'{"message": ')

    async def test_client_cannot_set_server_fields(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        error = await self._assert_rejected(
            client, engine, fake_llm, content=b'{"message": "hi", "role": "system"}'
        )
        assert error["code"] == "validation_error"

    async def test_body_over_the_size_limit_is_413(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        body = b'{"message": "' + b"a" * (600 * 1024) + b'"}'
        error = await self._assert_rejected(client, engine, fake_llm, content=body, status=413)
        assert error["code"] == "payload_too_large"

    async def test_unknown_conversation_is_404_and_stores_nothing(
        self, client: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        for conversation_id in (str(uuid.uuid4()), "not-a-uuid"):
            response = await send(client, conversation_id, "hi")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        assert await count_rows(engine, "messages") == 0
        assert fake_llm.requests == []
