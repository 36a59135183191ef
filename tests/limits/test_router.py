"""The limits as a client meets them: 429 with `Retry-After` and the OpenAI/Groq
`x-ratelimit-*` headers, per-key overrides, the daily token budget, concurrent streams, the
`max_tokens` clamp, the model allowlist, and clients that keep sending bad keys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import send
from tests.conftest import AppFactory, client_for, count_rows, create_conversation, issue_key
from tests.limits.conftest import REDIS_URL

BAD_KEY = "cbk_" + "x" * 43


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def limits_for(backend: str, prefix: str, **values: Any) -> dict[str, Any]:
    return {"backend": backend, "redis_url": REDIS_URL, "redis_prefix": prefix, **values}


class TestRequestsPerMinute:
    @pytest.mark.parametrize("backend", ["memory", "redis"])
    async def test_over_the_limit_is_a_429_with_openai_headers(
        self, app_factory: AppFactory, backend: str, redis_prefix: str
    ) -> None:
        app = await app_factory(limits=limits_for(backend, redis_prefix, requests_per_minute=3))
        async with client_for(app) as http:
            responses = [await http.get("/api/v1/conversations") for _ in range(4)]

        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:3]] == [
            "2",
            "1",
            "0",
        ]
        refused = responses[3]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")

    async def test_a_key_can_carry_its_own_limit(self, app: FastAPI) -> None:
        tight = client_for(app, await issue_key(app, requests_per_minute=2))
        other = client_for(app)
        async with tight, other:
            codes = [(await tight.get("/api/v1/conversations")).status_code for _ in range(3)]
            unaffected = await other.get("/api/v1/conversations")

        assert codes == [200, 200, 429]
        assert unaffected.status_code == 200
        assert unaffected.headers["x-ratelimit-limit-requests"] == "1000000"


class TestTokensPerDay:
    async def test_a_spent_budget_is_a_429_until_midnight(
        self, app_factory: AppFactory, fake_llm: FakeLLM
    ) -> None:
        fake_llm.default = Script(reply="one two three", prompt_tokens=40)
        app = await app_factory(limits={"tokens_per_day": 40})
        async with client_for(app) as http:
            conversation_id = await create_conversation(http)
            first = await send(http, conversation_id, "hello")
            await app.state.generations.settled()
            second = await send(http, conversation_id, "again")

        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] == 43
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "token_budget_exhausted"
        assert second.headers["x-ratelimit-limit-tokens"] == "40"
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(second.headers["Retry-After"]) <= 86_400
        assert len(fake_llm.requests) == 1

    async def test_usage_is_counted_once_per_reply(
        self, app_factory: AppFactory, fake_llm: FakeLLM
    ) -> None:
        # An idempotent retry reads the same reply again: it must not be charged twice.
        fake_llm.default = Script(reply="one two three", prompt_tokens=40)
        app = await app_factory(limits={"tokens_per_day": 100})
        async with client_for(app) as http:
            conversation_id = await create_conversation(http)
            headers = {"Idempotency-Key": "retry-1"}
            path = f"/api/v1/conversations/{conversation_id}/messages"
            for _ in range(3):
                response = await http.post(path, json={"message": "hi"}, headers=headers)
                assert response.status_code == 200, response.text
                await app.state.generations.settled()
            after = await send(http, conversation_id, "next")

        assert after.status_code == 200, after.text
        assert len(fake_llm.requests) == 2


class TestConcurrentStreams:
    async def test_one_key_cannot_hold_more_generations_than_its_limit(
        self, app_factory: AppFactory, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=tuple(f"t{i} " for i in range(20)), token_delay=0.05))
        app = await app_factory(limits={"concurrent_streams": 1})
        async with client_for(app) as http:
            first_id = await create_conversation(http)
            second_id = await create_conversation(http)
            running = asyncio.create_task(send(http, first_id, "long one"))
            await until(lambda: bool(fake_llm.requests))
            refused = await send(http, second_id, "meanwhile")
            assert (await running).status_code == 200
            await app.state.generations.settled()
            later = await send(http, second_id, "now")

        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert int(refused.headers["Retry-After"]) >= 1
        assert later.status_code == 200

    async def test_a_turn_that_does_not_start_gives_its_slot_back(
        self, app_factory: AppFactory
    ) -> None:
        app = await app_factory(limits={"concurrent_streams": 1})
        async with client_for(app) as http:
            missing = await send(http, "00000000-0000-4000-8000-00000000abcd", "x")
            conversation_id = await create_conversation(http)
            served = await send(http, conversation_id, "x")

        assert missing.status_code == 404
        assert served.status_code == 200


class TestGenerationOptions:
    async def test_max_tokens_is_clamped_to_the_server_cap(
        self, app_factory: AppFactory, fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"max_tokens": 100})
        async with client_for(app) as http:
            conversation_id = await create_conversation(http)
            path = f"/api/v1/conversations/{conversation_id}/messages"
            big = await http.post(path, json={"message": "a", "max_tokens": 5000})
            small = await http.post(path, json={"message": "b", "max_tokens": 7})
            default = await http.post(path, json={"message": "c"})

        assert [r.status_code for r in (big, small, default)] == [200, 200, 200]
        assert [r.body["max_tokens"] for r in fake_llm.requests] == [100, 7, 100]

    async def test_a_model_outside_the_allowlist_is_a_403_and_nothing_is_stored(
        self, app: FastAPI, client: httpx.AsyncClient, fake_llm: FakeLLM, engine: Any
    ) -> None:
        conversation_id = await create_conversation(client)

        response = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"message": "hi", "model": "gpt-4-very-expensive"},
        )

        assert response.status_code == 403
        assert response.json()["error"]["code"] == "model_not_allowed"
        assert response.json()["error"]["details"] == [{"allowed_models": ["fake-model"]}]
        assert fake_llm.requests == []
        assert await count_rows(engine, "messages") == 0

    async def test_an_allowed_model_is_the_one_asked_upstream(
        self, app_factory: AppFactory, fake_llm: FakeLLM
    ) -> None:
        app = await app_factory(llm={"allowed_models": "small-model, other-model"})
        async with client_for(app) as http:
            conversation_id = await create_conversation(http)
            path = f"/api/v1/conversations/{conversation_id}/messages"
            chosen = await http.post(path, json={"message": "hi", "model": "small-model"})
            default = await http.post(path, json={"message": "hi", "model": "fake-model"})

        assert (chosen.status_code, default.status_code) == (200, 200)
        assert [r.body["model"] for r in fake_llm.requests] == ["small-model", "fake-model"]


class TestFailedAuthentication:
    async def test_a_client_sending_bad_keys_gets_429_sooner_than_traffic_does(
        self, app_factory: AppFactory
    ) -> None:
        app = await app_factory(auth={"failed_attempts_per_minute": 3})
        good = app.state.test_api_key
        attacker = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 4000)),
            base_url="http://testserver",
        )
        neighbour = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("198.51.100.7", 4000)),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {good}"},
        )
        async with attacker, neighbour:
            guesses = [
                await attacker.get(
                    "/api/v1/conversations", headers={"Authorization": f"Bearer {BAD_KEY}"}
                )
                for _ in range(4)
            ]
            # Blocked before the key is looked at: even a valid key learns nothing here.
            valid_from_attacker = await attacker.get(
                "/api/v1/conversations", headers={"Authorization": f"Bearer {good}"}
            )
            served = [await neighbour.get("/api/v1/conversations") for _ in range(5)]

        assert [r.status_code for r in guesses] == [401, 401, 401, 429]
        assert guesses[0].json()["error"]["code"] == "invalid_api_key"
        assert guesses[3].json()["error"]["code"] == "too_many_failed_attempts"
        assert int(guesses[3].headers["Retry-After"]) >= 1
        assert valid_from_attacker.status_code == 429
        assert {r.status_code for r in served} == {200}
