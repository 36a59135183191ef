"""Stopping a generation: the upstream call is closed, the partial reply is stored as
`cancelled` with its usage, and the call is idempotent."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages, parse_sse, send
from tests.conftest import create_conversation

SLOW_TEXT = tuple(f"w{i} " for i in range(100))
SLOW = Script(deltas=SLOW_TEXT, token_delay=0.05)


async def _wait_for_text(client: httpx.AsyncClient, conversation_id: str) -> str:
    """The assistant message id, once the generation has started."""
    async with asyncio.timeout(10):
        while True:
            stored = await messages(client, conversation_id)
            if len(stored) == 2:
                return str(stored[1]["id"])
            await asyncio.sleep(0.02)


def _cancel_url(conversation_id: str, message_id: str) -> str:
    return f"/api/v1/conversations/{conversation_id}/messages/{message_id}/cancel"


class TestCancel:
    async def test_cancel_closes_upstream_and_stores_the_partial_as_cancelled(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(SLOW)
        conversation_id = await create_conversation(client)
        stream = asyncio.create_task(
            client.post(
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"message": "count", "stream": True},
            )
        )
        message_id = await _wait_for_text(client, conversation_id)
        await asyncio.sleep(0.3)

        started = time.monotonic()
        response = await client.post(_cancel_url(conversation_id, message_id))
        elapsed = time.monotonic() - started

        assert response.status_code == 200, response.text
        cancelled = response.json()
        assert cancelled["status"] == "cancelled"
        assert 0 < len(cancelled["content"]) < len("".join(SLOW_TEXT))
        assert cancelled["usage"]["completion_tokens"] > 0
        assert cancelled["error"]["code"] == "cancelled"
        assert elapsed < 1.0
        await asyncio.wait_for(fake_llm.requests[0].finished.wait(), 1)
        assert fake_llm.requests[0].cancelled is True

        events = parse_sse((await stream).text)
        assert events[-1].event == "message.incomplete"
        assert events[-1].data["status"] == "cancelled"
        text = "".join(e.data["delta"] for e in events if e.event == "message.delta")
        assert text == cancelled["content"]

    async def test_cancel_is_idempotent(self, client: httpx.AsyncClient, fake_llm: FakeLLM) -> None:
        fake_llm.enqueue(SLOW)
        conversation_id = await create_conversation(client)
        request = asyncio.create_task(send(client, conversation_id, "count"))
        message_id = await _wait_for_text(client, conversation_id)

        first = await client.post(_cancel_url(conversation_id, message_id))
        second = await client.post(_cancel_url(conversation_id, message_id))

        assert first.json() == second.json()
        assert second.json()["status"] == "cancelled"
        failed = await request
        assert failed.status_code == 409
        assert failed.json()["error"]["code"] == "cancelled"

    async def test_cancelling_a_finished_reply_changes_nothing(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)
        reply = (await send(client, conversation_id, "hi")).json()

        response = await client.post(_cancel_url(conversation_id, reply["assistant_message_id"]))

        assert response.status_code == 200
        assert response.json()["status"] == "completed"
        assert response.json()["content"] == reply["response"]

    async def test_conversation_accepts_a_new_message_after_cancel(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(SLOW)
        conversation_id = await create_conversation(client)
        request = asyncio.create_task(send(client, conversation_id, "count"))
        message_id = await _wait_for_text(client, conversation_id)
        await client.post(_cancel_url(conversation_id, message_id))
        await request

        after = await send(client, conversation_id, "again")

        assert after.status_code == 200
        # The cancelled partial is part of the context the model sees next.
        assert fake_llm.messages(1)[2]["role"] == "assistant"

    async def test_unknown_or_user_message_is_404(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(client)
        reply = (await send(client, conversation_id, "hi")).json()

        for message_id in (str(uuid.uuid4()), reply["user_message_id"], "nope"):
            response = await client.post(_cancel_url(conversation_id, message_id))
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
