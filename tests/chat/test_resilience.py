"""Retries, fallbacks and deadlines as the API client sees them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages, send
from tests.conftest import client_for, create_conversation


@pytest.fixture
async def fallback_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(model="fallback-model") as fake:
        yield fake


class TestRetries:
    async def test_transient_errors_are_retried_before_any_text(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"max_retries": 2})
        fake_llm.enqueue(Script(status=503, fail_times=2))
        fake_llm.enqueue(Script(reply="third time lucky"))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "hi")

        assert response.status_code == 200
        assert response.json()["response"] == "third time lucky"
        assert response.headers["X-Upstream-Attempts"] == "3"
        assert len(fake_llm.requests) == 3

    async def test_retry_after_beyond_the_cap_fails_fast_and_is_passed_on(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"max_retries": 2, "retry_after_cap": 5})
        fake_llm.enqueue(Script(status=429, retry_after=120))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "hi")

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_rate_limited"
        assert response.headers["Retry-After"] == "120"
        assert len(fake_llm.requests) == 1

    async def test_no_retry_after_text_has_reached_the_client(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"max_retries": 2})
        fake_llm.enqueue(Script(deltas=("a ", "b ", "c"), after_tokens=2, then="reset"))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            await send(client, conversation_id, "hi")
            reply = (await messages(client, conversation_id))[1]

        assert (reply["status"], reply["content"]) == ("incomplete", "a b ")
        assert len(fake_llm.requests) == 1


class TestFallbacks:
    async def test_fallback_answers_and_model_used_says_so(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, fallback_llm: FakeLLM
    ) -> None:
        app = await app_factory(
            llm={
                "fallbacks": f"openai:fallback-model@{fallback_llm.base_url}",
                "openai_api_key": "sk-fallback-key",
            }
        )
        fake_llm.enqueue(Script(status=503))
        fallback_llm.enqueue(Script(reply="from the fallback"))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "hi")
            stored = (await messages(client, conversation_id))[1]

        assert response.status_code == 200
        body = response.json()
        assert (body["response"], body["model_used"]) == ("from the fallback", "fallback-model")
        assert response.headers["X-Upstream-Fallbacks"] == "1"
        assert stored["model_used"] == "fallback-model"
        assert fallback_llm.requests[0].headers["Authorization"] == "Bearer sk-fallback-key"

    async def test_open_breaker_skips_a_dead_provider(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, fallback_llm: FakeLLM
    ) -> None:
        app = await app_factory(
            llm={
                "fallbacks": f"openai:fallback-model@{fallback_llm.base_url}",
                "breaker_failures": 2,
                "breaker_cooldown": 60,
            }
        )
        fake_llm.default = Script(status=500)
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            for _ in range(4):
                assert (await send(client, conversation_id, "hi")).status_code == 200

        assert len(fake_llm.requests) == 2
        assert len(fallback_llm.requests) == 4


class TestDeadlines:
    async def test_idle_deadline_fires_through_keep_alive_pings(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"idle_timeout": 0.3})
        fake_llm.enqueue(Script(deltas=("a ", "b ", "c"), after_tokens=2, then="ping"))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "hi")
            reply = (await messages(client, conversation_id))[1]

        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert (reply["status"], reply["content"]) == ("incomplete", "a b ")

    async def test_length_finish_is_a_completed_reply(self, client: Any, fake_llm: FakeLLM) -> None:
        fake_llm.enqueue(Script(reply="cut by max_tokens", finish_reason="length"))
        conversation_id = await create_conversation(client)

        response = await send(client, conversation_id, "hi")

        assert response.json()["finish_reason"] == "length"
        assert (await messages(client, conversation_id))[1]["finish_reason"] == "length"
