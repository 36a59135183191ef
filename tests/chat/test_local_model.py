"""The embedded model through the API, for real: the same code path as remote providers."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.chat.helpers import messages, send, send_stream
from tests.conftest import client_for, create_conversation

pytestmark = pytest.mark.local_model

LOCAL = {"provider": "local", "model": None, "max_tokens": 48, "local_n_ctx": 2048}


class TestEmbeddedModelThroughTheApi:
    async def test_non_streaming_reply_is_generated_and_stored(
        self, app_factory: Callable[..., Any]
    ) -> None:
        app = await app_factory(llm=LOCAL)
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "What is the capital of France?")

            assert response.status_code == 200, response.text
            body = response.json()
            assert body["response"].strip()
            assert body["model_used"] == "SmolLM2-135M-Instruct"
            assert body["usage"]["completion_tokens"] > 0
            reply = (await messages(client, conversation_id))[1]
            assert reply["content"] == body["response"]

    async def test_streamed_deltas_equal_the_stored_reply(
        self, app_factory: Callable[..., Any]
    ) -> None:
        app = await app_factory(llm=LOCAL)
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            _, events = await send_stream(client, conversation_id, "Say hello in Spanish.")

            assert events[-1].event == "message.completed"
            text = "".join(e.data["delta"] for e in events if e.event == "message.delta")
            assert text.strip()
            assert (await messages(client, conversation_id))[1]["content"] == text

    async def test_health_answers_while_the_model_generates(
        self, app_factory: Callable[..., Any]
    ) -> None:
        app = await app_factory(llm={**LOCAL, "max_tokens": 200})
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            generation = asyncio.create_task(
                send(client, conversation_id, "Write a long story about a dragon.")
            )
            await asyncio.sleep(0.3)
            latencies = []
            while not generation.done():
                started = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
            assert (await generation).status_code == 200

        # A blocked event loop would hold every probe for the whole generation (seconds);
        # the bounds are loose enough for a busy machine and far below that.
        assert len(latencies) >= 5
        assert statistics.median(latencies) < 0.05, latencies
        assert max(latencies) < 1.0, latencies
