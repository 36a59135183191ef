"""Every error, ours or the framework's, is rendered in the one envelope; oversized bodies are
refused before they are read, whether or not they declare their length."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.config import (
    AuthSettings,
    DatabaseSettings,
    LimitSettings,
    LLMSettings,
    Settings,
)
from chatbot_api.main import create_app
from chatbot_api.testing.fake_llm import FakeLLM
from tests.conftest import (
    FAKE_KEY,
    TEST_SERVER_SECRET,
    AppFactory,
    client_for,
    count_rows,
    create_conversation,
)

BASE = "/api/v1/conversations"
LIMIT = 1024
JSON_HEADERS = {"Content-Type": "application/json"}


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    return error


def body_of_size(size: int) -> bytes:
    """A valid conversation body, padded through its metadata to exactly `size` bytes."""
    empty = json.dumps({"metadata": {"pad": ""}}).encode()
    body = json.dumps({"metadata": {"pad": "x" * (size - len(empty))}}).encode()
    assert len(body) == size
    return body


async def in_chunks(body: bytes, size: int = 200) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


class TestFrameworkErrors:
    async def test_unknown_route_is_a_404_envelope(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v1/nothing-here")

        assert_envelope(response, 404, "not_found")

    async def test_wrong_method_is_a_405_envelope_with_allow(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.put(BASE, json={})

        assert_envelope(response, 405, "method_not_allowed")
        allowed = {method.strip() for method in response.headers["Allow"].split(",")}
        assert "POST" in allowed
        assert "PUT" not in allowed

    async def test_allow_lists_every_method_of_the_resource(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.put(BASE, json={})

        allowed = {method.strip() for method in response.headers["Allow"].split(",")}
        assert allowed == {"GET", "POST"}

    async def test_invalid_json_is_a_422_envelope(
        self, client: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await client.post(BASE, content=b'{"title": "t",', headers=JSON_HEADERS)

        error = assert_envelope(response, 422, "validation_error")
        assert error["details"][0]["type"] == "json_invalid"
        assert await count_rows(engine, "conversations") == 0

    async def test_body_that_is_not_an_object_is_a_422_envelope(
        self, client: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await client.post(BASE, json=["title"])

        assert_envelope(response, 422, "validation_error")
        assert await count_rows(engine, "conversations") == 0


class TestUnhandledError:
    async def test_is_a_500_envelope_without_traceback(self, app: FastAPI) -> None:
        async def explode() -> None:
            raise RuntimeError("secret internal detail")

        app.add_api_route("/test-explode", explode, methods=["GET"])
        # The server re-raises after answering (so that it is logged); the transport must
        # not turn that into a test error.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            response = await http.get("/test-explode")

        assert_envelope(response, 500, "internal_error")
        assert "secret internal detail" not in response.text
        assert "Traceback" not in response.text
        assert "RuntimeError" not in response.text


class TestBodySizeLimit:
    @pytest.fixture
    async def limited(self, app_factory: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
        app = await app_factory(limits={"max_body_bytes": LIMIT})
        async with client_for(app) as http:
            yield http

    async def test_body_at_the_limit_is_accepted(self, limited: httpx.AsyncClient) -> None:
        response = await limited.post(BASE, content=body_of_size(LIMIT), headers=JSON_HEADERS)

        assert response.status_code == 201, response.text

    async def test_declared_length_over_the_limit_is_a_413(
        self, limited: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await limited.post(BASE, content=body_of_size(LIMIT + 1), headers=JSON_HEADERS)

        assert response.request.headers["Content-Length"] == str(LIMIT + 1)
        assert_envelope(response, 413, "payload_too_large")
        assert await count_rows(engine, "conversations") == 0

    async def test_chunked_body_over_the_limit_is_a_413(
        self, limited: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await limited.post(
            BASE, content=in_chunks(body_of_size(LIMIT * 3)), headers=JSON_HEADERS
        )

        assert "Content-Length" not in response.request.headers
        assert_envelope(response, 413, "payload_too_large")
        assert await count_rows(engine, "conversations") == 0

    async def test_chunked_body_under_the_limit_is_accepted(
        self, limited: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await limited.post(
            BASE, content=in_chunks(body_of_size(LIMIT - 100)), headers=JSON_HEADERS
        )

        assert response.status_code == 201, response.text
        assert await count_rows(engine, "conversations") == 1

    async def test_chat_message_over_the_limit_is_never_sent_upstream(
        self, limited: httpx.AsyncClient, engine: AsyncEngine, fake_llm: FakeLLM
    ) -> None:
        conversation_id = await create_conversation(limited)

        response = await limited.post(
            f"{BASE}/{conversation_id}/messages", json={"message": "x" * (LIMIT * 2)}
        )

        assert_envelope(response, 413, "payload_too_large")
        assert await count_rows(engine, "messages") == 0
        assert fake_llm.requests == []


class TestDatabaseUnavailable:
    async def test_refused_connection_is_a_503_with_retry_after(self, fake_llm: FakeLLM) -> None:
        settings = Settings(
            _env_file=None,
            environment="test",
            db=DatabaseSettings(_env_file=None, url="postgresql+asyncpg://postgres@127.0.0.1:1/x"),
            llm=LLMSettings(
                _env_file=None,
                provider="openai",
                base_url=fake_llm.base_url,
                api_key=SecretStr(FAKE_KEY),
                model="fake-model",
            ),
            limits=LimitSettings(_env_file=None),
            auth=AuthSettings(_env_file=None, server_secret=SecretStr(TEST_SERVER_SECRET)),
        )
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport,
                base_url="http://testserver",
                # Well formed: checking it is what needs the database.
                headers={"Authorization": "Bearer cbk_" + "0" * 43},
            ) as http,
        ):
            response = await http.post(BASE)

        assert_envelope(response, 503, "database_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
