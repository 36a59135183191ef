"""Hardening: security headers on every response, CORS off unless configured and never with
credentials, mass assignment refused, no secret in logs, errors or the OpenAPI document, and
settings that refuse the placeholder server secret outside development."""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from chatbot_api.config import DEV_SERVER_SECRET, AuthSettings, Settings
from chatbot_api.security import API_CSP, RedactSecrets, redact
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.conftest import FAKE_KEY, AppFactory, client_for, create_conversation

# What a leaked credential looks like: ours, Groq's, OpenAI's, or a whole Authorization value.
SECRET = re.compile(r"cbk_|gsk_|\bsk-|Bearer ")


def assert_hardened(response: httpx.Response, *, docs: bool = False) -> None:
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff", response.url
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    if docs:
        assert "Content-Security-Policy" not in headers
    else:
        assert headers["Content-Security-Policy"] == API_CSP


class TestSecurityHeaders:
    async def test_on_every_kind_of_response(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        async def explode() -> None:
            raise RuntimeError("boom")

        app.add_api_route("/api/v1/test-explode", explode, methods=["GET"])
        conversation_id = await create_conversation(client)
        raw = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://testserver",
            headers=client.headers,
        )
        async with raw:
            responses = {
                "ok": await client.get(f"/api/v1/conversations/{conversation_id}"),
                "created": await client.post("/api/v1/conversations"),
                "no content": await client.delete(f"/api/v1/conversations/{conversation_id}"),
                "not found": await client.get("/nowhere"),
                "not allowed": await client.put("/api/v1/conversations"),
                "invalid": await client.post("/api/v1/conversations", json={"title": 5}),
                "too large": await client.post(
                    "/api/v1/conversations",
                    content=b"x" * 600_000,
                    headers={"Content-Type": "application/json"},
                ),
                "unauthenticated": await raw.get(
                    "/api/v1/conversations", headers={"Authorization": ""}
                ),
                "server error": await raw.get("/api/v1/test-explode"),
                "health": await client.get("/health"),
                "schema": await client.get("/openapi.json"),
            }

        assert [r.status_code for r in responses.values()] == [
            200,
            201,
            204,
            404,
            405,
            422,
            413,
            401,
            500,
            200,
            200,
        ]
        for response in responses.values():
            assert_hardened(response)
        assert responses["not allowed"].headers["Allow"] == "GET, POST"

    async def test_streams_carry_them_too(self, client: httpx.AsyncClient) -> None:
        conversation_id = await create_conversation(client)

        response = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"message": "hi", "stream": True},
        )

        assert response.headers["content-type"].startswith("text/event-stream")
        assert_hardened(response)

    @pytest.mark.parametrize("path", ["/docs", "/redoc"])
    async def test_docs_pages_are_framed_out_but_may_load_their_scripts(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        response = await client.get(path)

        assert response.status_code == 200
        assert_hardened(response, docs=True)

    async def test_authenticated_responses_carry_the_request_budget(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get("/api/v1/conversations")

        assert response.headers["x-ratelimit-limit-requests"] == "1000000"
        assert response.headers["x-ratelimit-remaining-requests"] == "999999"
        assert re.fullmatch(
            r"[0-9.]+(ms|s)|\d+m[0-9.]+s", response.headers["x-ratelimit-reset-requests"]
        )


class TestCors:
    PREFLIGHT: ClassVar[dict[str, str]] = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }

    async def test_off_by_default(self, client: httpx.AsyncClient) -> None:
        preflight = await client.options("/api/v1/conversations", headers=self.PREFLIGHT)
        simple = await client.get(
            "/api/v1/conversations", headers={"Origin": "https://evil.example"}
        )

        assert preflight.status_code == 405
        for response in (preflight, simple):
            assert "Access-Control-Allow-Origin" not in response.headers

    async def test_configured_origins_only_and_never_with_credentials(
        self, app_factory: AppFactory
    ) -> None:
        app = await app_factory(cors_origins="https://app.example, https://admin.example")
        async with client_for(app) as http:
            allowed = await http.options(
                "/api/v1/conversations",
                headers={**self.PREFLIGHT, "Origin": "https://app.example"},
            )
            refused = await http.options("/api/v1/conversations", headers=self.PREFLIGHT)
            actual = await http.get(
                "/api/v1/conversations", headers={"Origin": "https://admin.example"}
            )

        assert allowed.status_code == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
        assert refused.status_code == 400
        assert "Access-Control-Allow-Origin" not in refused.headers
        assert actual.headers["Access-Control-Allow-Origin"] == "https://admin.example"
        assert "x-ratelimit-remaining-requests" in actual.headers["Access-Control-Expose-Headers"]
        for response in (allowed, refused, actual):
            assert "Access-Control-Allow-Credentials" not in response.headers


class TestMassAssignment:
    @pytest.mark.parametrize(
        "field",
        [
            {"owner_id": "00000000-0000-4000-8000-000000000001"},
            {"id": "00000000-0000-4000-8000-000000000002"},
            {"created_at": "2020-01-01T00:00:00Z"},
            {"updated_at": "2020-01-01T00:00:00Z"},
            {"next_seq": 99},
            {"busy_until": "2099-01-01T00:00:00Z"},
        ],
    )
    async def test_server_owned_conversation_fields_are_refused(
        self, client: httpx.AsyncClient, field: dict[str, Any]
    ) -> None:
        conversation_id = await create_conversation(client)

        created = await client.post("/api/v1/conversations", json=field)
        patched = await client.patch(f"/api/v1/conversations/{conversation_id}", json=field)

        assert (created.status_code, patched.status_code) == (422, 422)

    @pytest.mark.parametrize(
        "field",
        [
            {"role": "system"},
            {"status": "completed"},
            {"owner_id": "00000000-0000-4000-8000-000000000001"},
            {"created_at": "2020-01-01T00:00:00Z"},
            {"base_url": "http://169.254.169.254/latest"},
            {"api_base": "http://attacker.example/v1"},
            {"provider": "openai"},
            {"api_key": "sk-mine"},
        ],
    )
    async def test_a_send_cannot_set_roles_owners_or_provider_urls(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, field: dict[str, Any]
    ) -> None:
        conversation_id = await create_conversation(client)

        response = await client.post(
            f"/api/v1/conversations/{conversation_id}/messages", json={"message": "hi", **field}
        )

        assert response.status_code == 422
        assert fake_llm.requests == []


class TestNoSecretLeaks:
    async def test_logs_errors_and_openapi_hold_no_credential(
        self,
        app_factory: AppFactory,
        fake_llm: FakeLLM,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        fake_llm.enqueue(
            Script(status=401, error_body=f'{{"error": {{"message": "bad key {FAKE_KEY}"}}}}'),
            Script(status=500),
        )
        app = await app_factory(auth={"failed_attempts_per_minute": 2})
        key = app.state.test_api_key
        bodies: list[str] = []
        async with client_for(app) as http:
            conversation_id = await create_conversation(http)
            path = f"/api/v1/conversations/{conversation_id}/messages"
            for call in (
                http.post(path, json={"message": "upstream refuses our key"}),
                http.post(path, json={"message": "upstream breaks"}),
                http.get(f"/api/v1/conversations?api_key={key}"),
                http.get("/api/v1/conversations", headers={"Authorization": f"Bearer {key}x"}),
                http.get("/api/v1/conversations", headers={"Authorization": "Bearer gsk_abcdefgh"}),
                http.get("/api/v1/conversations", headers={"Authorization": "Bearer sk-abcdefgh"}),
                http.post(path, json={"message": "hi", "api_key": key}),
                http.get("/openapi.json"),
            ):
                response = await call
                bodies.append(response.text + repr(dict(response.headers)))

        assert len(fake_llm.requests) == 2
        assert [SECRET.findall(body) for body in bodies] == [[]] * len(bodies)
        leaked = [r.getMessage() for r in caplog.records if SECRET.search(r.getMessage())]
        assert leaked == []
        assert key not in caplog.text

    def test_redaction_rewrites_secret_shaped_log_records(self) -> None:
        record = logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s"',
            (
                "127.0.0.1",
                "GET",
                "/api/v1/conversations?api_key=cbk_" + "A" * 43,
            ),
            None,
        )

        RedactSecrets().filter(record)

        assert "cbk_" not in record.getMessage()
        assert "[redacted]" in record.getMessage()
        assert redact("Authorization: Bearer abc.def") == "Authorization: [redacted]"
        assert redact("gsk_0123456789 and sk-proj-abcdefghij") == "[redacted] and [redacted]"


class TestServerSecret:
    @pytest.mark.parametrize("environment", ["production", "test"])
    def test_the_placeholder_is_refused_outside_development(self, environment: str) -> None:
        with pytest.raises(ValidationError, match="AUTH_SERVER_SECRET"):
            Settings(_env_file=None, environment=environment)

    def test_a_short_secret_is_refused_too(self) -> None:
        with pytest.raises(ValidationError, match="at least 32"):
            Settings(
                _env_file=None,
                environment="production",
                auth=AuthSettings(_env_file=None, server_secret=SecretStr("short")),
            )

    def test_development_runs_on_the_documented_default(self) -> None:
        settings = Settings(_env_file=None)

        assert settings.auth.server_secret.get_secret_value() == DEV_SERVER_SECRET
        assert DEV_SERVER_SECRET not in repr(settings)

    def test_environment_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTH_MODE", "disabled")
        monkeypatch.setenv("AUTH_SERVER_SECRET", "s" * 40)
        monkeypatch.setenv("RATE_LIMIT_REQUESTS_PER_MINUTE", "7")
        monkeypatch.setenv("RATE_LIMIT_CONCURRENT_STREAMS", "2")
        monkeypatch.setenv("RATE_LIMIT_TOKENS_PER_DAY", "9000")
        monkeypatch.setenv("LIMITS_BACKEND", "redis")
        monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
        monkeypatch.setenv("LLM_ALLOWED_MODELS", "a, b")
        monkeypatch.setenv("CORS_ORIGINS", "https://x.example")

        settings = Settings(_env_file=None, environment="production")

        assert settings.auth.mode == "disabled"
        limits = settings.limits
        assert (limits.requests_per_minute, limits.concurrent_streams) == (7, 2)
        assert (limits.tokens_per_day, limits.backend) == (9000, "redis")
        assert limits.redis_url == "redis://cache:6379/1"
        assert settings.llm.allowed_model_list == ["a", "b"]
        assert settings.cors_origin_list == ["https://x.example"]
