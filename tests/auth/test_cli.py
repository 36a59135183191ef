"""`chatbot-api keys create|list|revoke` as real processes, and `serve` refusing to expose an
unauthenticated API on a public address."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from chatbot_api.auth.cli import display_url, is_loopback, refuse_public_without_auth
from chatbot_api.config import AuthSettings, DatabaseSettings, Settings
from chatbot_api.main import create_app
from tests.conftest import TEST_SERVER_SECRET, AppFactory, client_for
from tests.test_cli import run


def keys(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = run(
        [sys.executable, "-m", "chatbot_api.cli", "keys", *args],
        cwd=tmp_path,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}",
        AUTH_SERVER_SECRET=TEST_SERVER_SECRET,
    )
    return result.returncode, result.stdout, result.stderr


class TestKeysCommand:
    def test_create_prints_the_key_as_its_last_line(self, tmp_path: Path) -> None:
        code, out, err = keys(tmp_path, "create", "--name", "laptop", "--user", "alice")

        assert code == 0, err
        last = out.strip().splitlines()[-1]
        assert last.startswith("cbk_")
        assert len(last) == 47
        assert "alice" in out
        assert "expires never" in out

    def test_list_shows_keys_without_their_secrets_and_revoke_marks_them(
        self, tmp_path: Path
    ) -> None:
        _, created, _ = keys(tmp_path, "create", "--name", "ci", "--admin", "--expires-in", "30d")
        secret = created.strip().splitlines()[-1]
        key_id = created.split()[3]
        code, listed, err = keys(tmp_path, "list")
        revoke_code, revoked, _ = keys(tmp_path, "revoke", key_id)
        _, relisted, _ = keys(tmp_path, "list")

        assert code == 0, err
        assert key_id in listed
        assert secret not in listed
        assert secret[:10] in listed
        assert "admin" in listed
        assert "active" in listed
        assert revoke_code == 0
        assert key_id in revoked
        assert "revoked" in relisted

    @pytest.mark.parametrize(
        "args",
        [
            ["create", "--name", "x", "--expires-in", "forever"],
            ["create", "--name", "x", "--rpm", "0"],
            ["revoke", "00000000-0000-4000-8000-0000000000ff"],
            ["revoke", "nonsense"],
        ],
    )
    def test_bad_input_exits_non_zero_and_prints_no_key(
        self, tmp_path: Path, args: list[str]
    ) -> None:
        code, out, _ = keys(tmp_path, *args)

        assert code != 0
        assert "cbk_" not in out

    async def test_a_key_from_the_cli_authenticates_over_http(
        self, tmp_path: Path, sqlite_url: str
    ) -> None:
        result = run(
            [sys.executable, "-m", "chatbot_api.cli", "keys", "create", "--name", "cli"],
            cwd=tmp_path,
            DATABASE_URL=sqlite_url,
            AUTH_SERVER_SECRET=TEST_SERVER_SECRET,
        )
        secret = result.stdout.strip().splitlines()[-1]
        app = create_app(
            Settings(
                _env_file=None,
                environment="test",
                auth=AuthSettings(_env_file=None, server_secret=SecretStr(TEST_SERVER_SECRET)),
                db=DatabaseSettings(_env_file=None, url=sqlite_url),
            )
        )
        async with app.router.lifespan_context(app), client_for(app, secret) as http:
            response = await http.get("/api/v1/conversations")

        assert response.status_code == 200, response.text


class TestServeRefusesPublicWithoutAuth:
    @pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.8.9.10"])
    def test_loopback_hosts(self, host: str) -> None:
        assert is_loopback(host)

    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.4", "example.com"])
    def test_public_hosts(self, host: str) -> None:
        assert not is_loopback(host)

    def test_the_check(self) -> None:
        disabled = Settings(_env_file=None, auth=AuthSettings(_env_file=None, mode="disabled"))
        forced = Settings(
            _env_file=None,
            auth=AuthSettings(_env_file=None, mode="disabled", allow_disabled_on_public=True),
        )

        assert refuse_public_without_auth(disabled, "0.0.0.0") is not None
        assert refuse_public_without_auth(disabled, "127.0.0.1") is None
        assert refuse_public_without_auth(forced, "0.0.0.0") is None
        assert refuse_public_without_auth(Settings(_env_file=None), "0.0.0.0") is None

    def test_serve_exits_before_binding(self, tmp_path: Path) -> None:
        result = run(
            [sys.executable, "-m", "chatbot_api.cli", "serve", "--host", "0.0.0.0", "--port", "9"],
            cwd=tmp_path,
            AUTH_MODE="disabled",
            DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        )

        assert result.returncode == 2
        assert "AUTH_ALLOW_DISABLED_ON_PUBLIC" in result.stderr
        assert not (tmp_path / "x.db").exists()

    def test_display_url_shows_wildcards_as_loopback(self) -> None:
        assert display_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
        assert display_url("::", 80) == "http://[::1]:80"
        assert display_url("api.internal", 8080) == "http://api.internal:8080"


class TestDisabledMode:
    async def test_one_local_user_needs_no_key(self, app_factory: AppFactory) -> None:
        app: FastAPI = await app_factory(auth={"mode": "disabled"})
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as http:
            created = await http.post("/api/v1/conversations", json={"title": "mine"})
            listed = await http.get("/api/v1/conversations")
            keys_listed = await http.get("/api/v1/admin/keys")

        assert created.status_code == 201
        assert [c["title"] for c in listed.json()["data"]] == ["mine"]
        assert keys_listed.status_code == 200
