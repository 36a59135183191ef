"""Authentication as a client meets it, and the admin key endpoints: 401 with
`WWW-Authenticate: Bearer` for a missing, malformed, unknown, revoked or expired key; keys in
the URL refused; admin scope required to manage keys; a new key's secret shown exactly once."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from chatbot_api.auth.models import KeyScope
from tests.conftest import client_for, issue_key

KEYS = "/api/v1/admin/keys"


async def admin_client(app: FastAPI) -> httpx.AsyncClient:
    return client_for(app, await issue_key(app, user="root", scope=KeyScope.ADMIN))


class TestAuthentication:
    @pytest.mark.parametrize(
        "authorization",
        [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-key", "Bearer cbk_" + "0" * 43],
    )
    async def test_no_valid_key_is_a_401_with_the_bearer_challenge(
        self, app: FastAPI, authorization: str | None
    ) -> None:
        headers = {} if authorization is None else {"Authorization": authorization}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers
        ) as anonymous:
            response = await anonymous.get("/api/v1/conversations")

        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] in {"unauthorized", "invalid_api_key"}

    @pytest.mark.parametrize("query", ["api_key=whatever", "token=x", "after=cbk_ABCDEFGH12345678"])
    async def test_a_key_in_the_query_string_is_refused(
        self, client: httpx.AsyncClient, query: str
    ) -> None:
        response = await client.get(f"/api/v1/conversations?{query}")

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "key_in_query"

    async def test_a_revoked_key_stops_working_at_once(self, app: FastAPI) -> None:
        async with await admin_client(app) as admin:
            created = (await admin.post(KEYS, json={"name": "temp"})).json()
            async with client_for(app, created["key"]) as holder:
                before = await holder.get("/api/v1/conversations")
                revoked = await admin.delete(f"{KEYS}/{created['id']}")
                after = await holder.get("/api/v1/conversations")

        assert before.status_code == 200
        assert revoked.status_code == 204
        assert after.status_code == 401
        assert after.json()["error"]["message"] == "The API key has been revoked."

    async def test_openapi_declares_the_bearer_scheme_for_swagger(self, app: FastAPI) -> None:
        schema = app.openapi()

        scheme = schema["components"]["securitySchemes"]["APIKey"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        operations = [
            op
            for path, item in schema["paths"].items()
            if path.startswith("/api/")
            for op in item.values()
        ]
        assert operations
        assert all({"APIKey": []} in op["security"] for op in operations)
        assert "security" not in schema["paths"]["/health"]["get"]


class TestAdminKeys:
    async def test_create_shows_the_secret_once_and_list_never(self, app: FastAPI) -> None:
        async with await admin_client(app) as admin:
            created = await admin.post(
                KEYS,
                json={
                    "name": "ci-bot",
                    "user": "ci",
                    "expires_in": "30d",
                    "limits": {"requests_per_minute": 5},
                },
            )
            listed = await admin.get(KEYS)

        assert created.status_code == 201, created.text
        body = created.json()
        assert body["key"].startswith("cbk_")
        assert (body["name"], body["user"], body["scope"]) == ("ci-bot", "ci", "user")
        assert body["expires_at"] is not None
        assert body["limits"]["requests_per_minute"] == 5
        assert body["hint"] == body["key"][:10] + "…"
        assert listed.status_code == 200
        entry = next(k for k in listed.json()["data"] if k["id"] == body["id"])
        assert "key" not in entry
        assert body["key"] not in listed.text
        assert entry["revoked_at"] is None

    async def test_an_admin_key_made_over_http_can_manage_keys(self, app: FastAPI) -> None:
        async with await admin_client(app) as admin:
            created = (await admin.post(KEYS, json={"name": "ops", "scope": "admin"})).json()
        async with client_for(app, created["key"]) as second_admin:
            listed = await second_admin.get(KEYS)

        assert listed.status_code == 200

    @pytest.mark.parametrize(
        ("method", "path"), [("GET", KEYS), ("POST", KEYS), ("DELETE", f"{KEYS}/{'0' * 32}")]
    )
    async def test_a_user_key_is_refused_with_403(
        self, client: httpx.AsyncClient, method: str, path: str
    ) -> None:
        response = await client.request(method, path, json={"name": "x"})

        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"

    @pytest.mark.parametrize("key_id", ["not-a-uuid", "00000000-0000-4000-8000-0000000000ff"])
    async def test_revoking_an_unknown_key_is_a_404(self, app: FastAPI, key_id: str) -> None:
        async with await admin_client(app) as admin:
            response = await admin.delete(f"{KEYS}/{key_id}")

        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "API key not found."}}

    async def test_revoking_twice_keeps_the_first_time(self, app: FastAPI) -> None:
        async with await admin_client(app) as admin:
            key_id = (await admin.post(KEYS, json={"name": "twice"})).json()["id"]
            await admin.delete(f"{KEYS}/{key_id}")
            first = next(k for k in (await admin.get(KEYS)).json()["data"] if k["id"] == key_id)
            again = await admin.delete(f"{KEYS}/{key_id}")
            second = next(k for k in (await admin.get(KEYS)).json()["data"] if k["id"] == key_id)

        assert again.status_code == 204
        assert first["revoked_at"] == second["revoked_at"] is not None

    @pytest.mark.parametrize(
        "body",
        [
            {"name": "x", "owner_id": "00000000-0000-4000-8000-000000000001"},
            {"name": "x", "secret_hash": "0" * 64},
            {"name": "x", "key": "cbk_" + "a" * 43},
            {"name": "x", "scope": "root"},
            {"name": "x", "expires_in": "forever"},
            {"name": "x", "limits": {"requests_per_minute": 0}},
            {"name": ""},
        ],
    )
    async def test_bad_or_server_owned_fields_are_refused(
        self, app: FastAPI, body: dict[str, object]
    ) -> None:
        async with await admin_client(app) as admin:
            response = await admin.post(KEYS, json=body)

        assert response.status_code == 422, response.text
