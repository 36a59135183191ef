"""Liveness, readiness and the API documentation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

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
    aiosqlite_threads_finished,
    client_for,
)

UNREACHABLE_DATABASES = [
    "postgresql+asyncpg://postgres@127.0.0.1:1/x",
    "sqlite+aiosqlite:////nonexistent-directory/for/chatbot.db",
]
CONVERSATION_ROUTES = {
    "/api/v1/conversations": {"get", "post"},
    "/api/v1/conversations/{conversation_id}": {"get", "patch", "delete"},
    "/api/v1/conversations/{conversation_id}/messages": {"get", "post"},
}


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app for `settings` with its lifespan running, as conftest's `app_factory` does."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http
    await aiosqlite_threads_finished()


def settings_with_database(url: str, fake_llm: FakeLLM) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        db=DatabaseSettings(_env_file=None, url=url, connect_timeout=1.0),
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


def not_ready_checks(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert isinstance(error["message"], str)
    checks: dict[str, Any] = error["details"][0]
    return checks


class TestLiveness:
    async def test_answers_ok(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health")

        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    @pytest.mark.parametrize("url", UNREACHABLE_DATABASES)
    async def test_does_not_depend_on_the_database(self, url: str, fake_llm: FakeLLM) -> None:
        async with serving(settings_with_database(url, fake_llm)) as http:
            response = await http.get("/health")

        assert response.status_code == 200


class TestReadiness:
    async def test_ready_with_database_and_provider(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/ready")

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert (body["database"], body["provider"]) == ("ok", "ok")
        assert body["model"] == "fake-model"

    @pytest.mark.parametrize("url", UNREACHABLE_DATABASES, ids=["postgresql", "sqlite"])
    async def test_unreachable_database_is_not_ready(self, url: str, fake_llm: FakeLLM) -> None:
        async with serving(settings_with_database(url, fake_llm)) as http:
            response = await http.get("/health/ready")

        checks = not_ready_checks(response)
        assert checks["database"] == "unavailable"
        assert checks["provider"] == "ok"

    async def test_provider_without_a_key_is_not_ready(
        self, app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("GROQ_API_KEY", raising=False)
        app = await app_factory(llm={"provider": "groq", "api_key": None, "base_url": None})

        async with client_for(app) as http:
            response = await http.get("/health/ready")

        checks = not_ready_checks(response)
        assert checks["provider"] == "not_configured"
        assert checks["database"] == "ok"


class TestDocs:
    @pytest.mark.parametrize("path", ["/docs", "/redoc"])
    async def test_pages_are_served(self, client: httpx.AsyncClient, path: str) -> None:
        response = await client.get(path)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")

    async def test_openapi_lists_the_conversation_routes(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/openapi.json")

        assert response.status_code == 200
        schema = response.json()
        for path, methods in CONVERSATION_ROUTES.items():
            assert set(schema["paths"][path]) >= methods, path
        assert (
            "404" in schema["paths"]["/api/v1/conversations/{conversation_id}"]["get"]["responses"]
        )

    async def test_openapi_title_is_the_project_name(self, app_factory: AppFactory) -> None:
        app = await app_factory(project_name="Mi Chatbot")

        async with client_for(app) as http:
            schema = (await http.get("/openapi.json")).json()

        assert schema["info"]["title"] == "Mi Chatbot"

    @pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
    async def test_disabled_docs_are_not_found(self, app_factory: AppFactory, path: str) -> None:
        app = await app_factory(docs_enabled=False)

        async with client_for(app) as http:
            response = await http.get(path)

        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
