"""`fast_routes`: a well-formed send or create is served without FastAPI's dependency solving,
and everything else goes on to FastAPI with its body intact, answered exactly as before."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.utils import solve_dependencies
from opentelemetry import trace
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

from chatbot_api.chat.turns import TurnManager
from chatbot_api.fast_routes import FastRoutes
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages
from tests.conftest import count_rows, create_conversation

BASE = "/api/v1/conversations"


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests whose dependencies FastAPI solved."""
    paths: list[str] = []
    original = solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        paths.append(kwargs["request"].url.path)
        return await original(*args, **kwargs)

    # The name the route handler calls it by.
    monkeypatch.setattr("fastapi.routing.solve_dependencies", counting)
    return paths


@pytest.fixture
async def conversation_id(client: httpx.AsyncClient, solved: list[str]) -> str:
    """A new conversation of the client's; `solved` starts empty after creating it."""
    created = await create_conversation(client)
    solved.clear()
    return created


class TestServedHere:
    async def test_json_and_stream_sends_skip_dependency_solving(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, solved: list[str], conversation_id: str
    ) -> None:
        fake_llm.enqueue(Script(reply="first"))
        fake_llm.enqueue(Script(reply="second"))

        plain = await client.post(
            f"{BASE}/{conversation_id}/messages",
            json={"message": "hi"},
            headers={"Idempotency-Key": "k-1"},
        )
        streamed = await client.post(
            f"{BASE}/{conversation_id}/messages", json={"message": "again", "stream": True}
        )

        assert plain.status_code == 200, plain.text
        assert plain.json()["response"] == "first"
        assert plain.headers["x-upstream-attempts"] == "1"
        assert plain.headers["x-content-type-options"] == "nosniff"
        assert "x-ratelimit-remaining-requests" in plain.headers
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert "message.completed" in streamed.text
        assert solved == []
        assert [m["content"] for m in await messages(client, conversation_id)] == [
            "hi",
            "first",
            "again",
            "second",
        ]

    async def test_errors_are_rendered_by_the_apps_handlers(
        self, client: httpx.AsyncClient, solved: list[str]
    ) -> None:
        unknown = await client.post(f"{BASE}/{uuid.uuid4()}/messages", json={"message": "hi"})
        malformed = await client.post(f"{BASE}/not-a-uuid/messages", json={"message": "hi"})

        for response in (unknown, malformed):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
            assert response.headers["x-content-type-options"] == "nosniff"
        assert solved == []

    async def test_a_database_error_is_a_503_not_a_500(
        self, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        conversation_id = await create_conversation(client)

        async def pool_timeout(*_args: Any, **_kwargs: Any) -> None:
            raise PoolTimeoutError("QueuePool limit reached")

        monkeypatch.setattr(TurnManager, "start", pool_timeout)
        response = await client.post(f"{BASE}/{conversation_id}/messages", json={"message": "x"})

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        assert "retry-after" in response.headers

    async def test_an_unexpected_error_is_the_500_envelope(
        self, app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async def explode(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("secret internal detail")

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        headers = {"Authorization": f"Bearer {app.state.test_api_key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=headers
        ) as http:
            conversation_id = await create_conversation(http)
            monkeypatch.setattr(TurnManager, "start", explode)
            response = await http.post(f"{BASE}/{conversation_id}/messages", json={"message": "x"})

        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "secret internal detail" not in response.text

    async def test_an_unknown_key_is_refused_here_too(
        self, client: httpx.AsyncClient, solved: list[str], conversation_id: str
    ) -> None:

        response = await client.post(
            f"{BASE}/{conversation_id}/messages",
            json={"message": "hi"},
            headers={"Authorization": "Bearer cbk_notarealkey0000"},
        )

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert solved == []


class TestCreateServedHere:
    @pytest.mark.parametrize(
        ("content", "headers"),
        [(b"", {}), (b"{}", {"Content-Type": "application/json"})],
        ids=["no-body", "empty-object"],
    )
    async def test_a_create_skips_dependency_solving(
        self,
        client: httpx.AsyncClient,
        solved: list[str],
        content: bytes,
        headers: dict[str, str],
    ) -> None:
        response = await client.post(BASE, content=content, headers=headers)

        assert response.status_code == 201, response.text
        assert response.json()["title"] is None
        assert "x-ratelimit-remaining-requests" in response.headers
        assert solved == []
        got = await client.get(f"{BASE}/{response.json()['id']}")
        assert got.status_code == 200

    async def test_a_create_with_fields_stores_them(
        self, client: httpx.AsyncClient, solved: list[str]
    ) -> None:
        body = {"title": "Trip", "system_prompt": "Be brief.", "metadata": {"k": 1}}

        response = await client.post(BASE, json=body)

        assert response.status_code == 201, response.text
        assert solved == []
        stored = (await client.get(f"{BASE}/{response.json()['id']}")).json()
        assert {k: stored[k] for k in body} == body

    async def test_a_create_without_a_key_is_refused_here(self, app: FastAPI) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            response = await http.post(BASE, json={})

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"

    @pytest.mark.parametrize(
        ("content", "headers", "status"),
        [
            (b'{"title": "' + b"x" * 201 + b'"}', {"Content-Type": "application/json"}, 422),
            (b"{}", {"Content-Type": "text/plain"}, 422),
            (b"null", {"Content-Type": "application/json"}, 201),
        ],
        ids=["title-too-long", "not-json", "null-body"],
    )
    async def test_what_is_not_plain_goes_to_fastapi(
        self,
        client: httpx.AsyncClient,
        solved: list[str],
        content: bytes,
        headers: dict[str, str],
        status: int,
    ) -> None:
        response = await client.post(BASE, content=content, headers=headers)

        assert response.status_code == status, response.text
        assert solved == [BASE]


class TestPassedOnToFastAPI:
    @pytest.mark.parametrize(
        ("body", "field"),
        [({"message": ""}, "message"), ({"message": "hi", "max_tokens": 0}, "max_tokens")],
    )
    async def test_an_invalid_body_is_fastapis_422_and_stores_nothing(
        self,
        client: httpx.AsyncClient,
        engine: AsyncEngine,
        solved: list[str],
        conversation_id: str,
        body: dict[str, Any],
        field: str,
    ) -> None:

        response = await client.post(f"{BASE}/{conversation_id}/messages", json=body)

        assert response.status_code == 422
        # FastAPI read the replayed body: it names the field, not a missing body.
        assert [d["loc"] for d in response.json()["error"]["details"]] == [["body", field]]
        assert solved == [f"{BASE}/{conversation_id}/messages"]
        assert await count_rows(engine, "messages") == 0

    @pytest.mark.parametrize(
        "headers",
        [
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/json", "Idempotency-Key": ""},
            {"Content-Type": "application/json", "Idempotency-Key": "k" * 256},
        ],
    )
    async def test_what_fastapi_refuses_it_still_refuses(
        self,
        client: httpx.AsyncClient,
        solved: list[str],
        conversation_id: str,
        headers: dict[str, str],
    ) -> None:

        response = await client.post(
            f"{BASE}/{conversation_id}/messages",
            content=json.dumps({"message": "hi"}),
            headers=headers,
        )

        assert response.status_code == 422
        assert response.json()["error"]["code"] == "validation_error"
        assert len(solved) == 1

    async def test_a_send_without_a_body_is_fastapis_422(
        self, client: httpx.AsyncClient, solved: list[str], conversation_id: str
    ) -> None:

        response = await client.post(
            f"{BASE}/{conversation_id}/messages", headers={"Content-Type": "application/json"}
        )

        assert response.status_code == 422
        assert [d["loc"] for d in response.json()["error"]["details"]] == [["body"]]
        assert len(solved) == 1

    async def test_a_passed_on_send_is_served_from_the_replayed_body(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM, solved: list[str], conversation_id: str
    ) -> None:
        fake_llm.enqueue(Script(reply="served by FastAPI"))

        # Two Idempotency-Key headers: not decided here.
        response = await client.post(
            f"{BASE}/{conversation_id}/messages",
            content=json.dumps({"message": "replayed"}).encode(),
            headers=[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "a"),
                ("Idempotency-Key", "a"),
            ],
        )

        assert response.status_code == 200, response.text
        assert response.json()["response"] == "served by FastAPI"
        assert len(solved) == 1
        assert [m["content"] for m in await messages(client, conversation_id)] == [
            "replayed",
            "served by FastAPI",
        ]


def _scope(**overrides: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": f"{BASE}/{uuid.uuid4()}/messages",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "fastapi.telemetry": None,
    }
    scope.update(overrides)
    return scope


@pytest.mark.parametrize(
    "scope",
    [
        _scope(method="GET"),
        _scope(path=f"{BASE}/{uuid.uuid4()}/messages/"),
        _scope(path=f"{BASE}/{uuid.uuid4()}/messages/{uuid.uuid4()}/stream"),
        _scope(root_path="/chat"),
        _scope(**{"fastapi.telemetry": object()}),
        _scope(headers=[(b"idempotency-key", b"a"), (b"idempotency-key", b"b")]),
        _scope(type="websocket"),
    ],
    ids=["method", "slash", "other-route", "root-path", "telemetry", "two-keys", "websocket"],
)
async def test_passes_on_without_reading_the_body(scope: Scope) -> None:
    """With FastAPI's telemetry configured its spans name the route, so FastAPI must route."""
    seen: list[Scope] = []

    async def inner(scope: Scope, _receive: Receive, _send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        raise AssertionError("the body was read")

    async def send(_message: Message) -> None:
        raise AssertionError("answered here")

    await FastRoutes(inner)(scope, receive, send)

    assert seen == [scope]


async def test_a_client_gone_mid_body_is_passed_on_with_what_was_read() -> None:
    replayed: list[Message] = []

    async def inner(_scope: Scope, receive: Receive, _send: Send) -> None:
        for _ in range(3):
            replayed.append(await receive())

    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"mess', "more_body": True},
        {"type": "http.disconnect"},
        {"type": "http.disconnect", "after": "the replay"},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(_message: Message) -> None:
        raise AssertionError("answered here")

    await FastRoutes(inner)(_scope(), receive, send)

    # What was read, in order, then the client's own receive.
    assert replayed == [
        {"type": "http.request", "body": b'{"mess', "more_body": True},
        {"type": "http.disconnect"},
        {"type": "http.disconnect", "after": "the replay"},
    ]


class _Tracing(trace.TracerProvider):
    """A configured tracer provider, as an app that sets up OpenTelemetry has one."""

    def get_tracer(self, *_args: Any, **_kwargs: Any) -> trace.Tracer:
        return trace.NoOpTracer()


async def test_with_tracing_configured_fastapi_routes_every_send(
    client: httpx.AsyncClient,
    fake_llm: FakeLLM,
    solved: list[str],
    conversation_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FastAPI's spans name the route it selected, so with tracing on it must route."""
    monkeypatch.setattr(trace, "get_tracer_provider", _Tracing)
    fake_llm.enqueue(Script(reply="traced"))

    response = await client.post(f"{BASE}/{conversation_id}/messages", json={"message": "hi"})

    assert response.status_code == 200, response.text
    assert response.json()["response"] == "traced"
    assert solved == [f"{BASE}/{conversation_id}/messages"]
