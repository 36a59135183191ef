"""Shared fixtures: migrated databases (SQLite and PostgreSQL), the fake LLM, the app and an
HTTP client on it.

Every test that uses `db_url` (directly or through `app`/`client`) runs once per database.
PostgreSQL is required: when it is unreachable these tests fail, they never skip. The schema
is created by Alembic, so migrations are exercised on every run; rows are deleted after each
test.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatbot_api import migrate
from chatbot_api.auth import service as auth_service
from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID, KeyScope, Principal
from chatbot_api.config import (
    AuthSettings,
    DatabaseSettings,
    LimitSettings,
    LLMSettings,
    ReliabilitySettings,
    Settings,
)
from chatbot_api.main import create_app
from chatbot_api.testing.fake_llm import FakeLLM

PG_SERVER = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_TEST_DB = f"chatbot_test_{os.getpid()}"
FAKE_KEY = "sk-test-fake-0123456789"
TEST_SERVER_SECRET = "test-server-secret-0123456789abcdef0123456789"
# The main suite is not about limits: each test's key may do far more than a real one.
# tests/limits/ sets its own.
GENEROUS_LIMITS = {
    "requests_per_minute": 1_000_000,
    "concurrent_streams": 10_000,
    "tokens_per_day": 1_000_000_000,
}


def pg_url(database: str) -> str:
    base = PG_SERVER.rsplit("/", 1)[0]
    return f"{base}/{database}"


async def recreate_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_SERVER, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def drop_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_SERVER, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    try:
        asyncio.run(recreate_pg_database(PG_TEST_DB))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_SERVER}: {exc}")
    url = "postgresql+asyncpg://" + pg_url(PG_TEST_DB).split("://", 1)[1]
    migrate.upgrade(url)
    yield url
    asyncio.run(drop_pg_database(PG_TEST_DB))


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("db") / "chatbot.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A direct engine on the test database, for assertions; it empties the tables after."""
    engine = create_async_engine(db_url)
    yield engine
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM messages"))
        await connection.execute(text("DELETE FROM conversations"))
        await connection.execute(text("DELETE FROM api_keys"))
        await connection.execute(delete(Principal).where(Principal.id != LOCAL_PRINCIPAL_ID))
    await engine.dispose()


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as fake:
        yield fake


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(db_url: str, fake_llm: FakeLLM) -> SettingsFactory:
    """Settings for the test database and the fake provider; keyword groups override."""

    def factory(
        *,
        llm: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        db: dict[str, Any] | None = None,
        reliability: dict[str, Any] | None = None,
        auth: dict[str, Any] | None = None,
        **top: Any,
    ) -> Settings:
        llm_values: dict[str, Any] = {
            "provider": "openai",
            "base_url": fake_llm.base_url,
            "api_key": FAKE_KEY,
            "model": "fake-model",
            "first_token_timeout": 5.0,
            "idle_timeout": 5.0,
            "total_timeout": 20.0,
            # Failure tests see each upstream error as is; retry tests turn retries back on.
            "max_retries": 0,
        }
        llm_values.update(llm or {})
        return Settings(
            _env_file=None,
            environment="test",
            db=DatabaseSettings(_env_file=None, **{"url": db_url, **(db or {})}),
            llm=LLMSettings(_env_file=None, **llm_values),
            limits=LimitSettings(_env_file=None, **{**GENEROUS_LIMITS, **(limits or {})}),
            reliability=ReliabilitySettings(_env_file=None, **(reliability or {})),
            auth=AuthSettings(
                _env_file=None,
                **{
                    "server_secret": TEST_SERVER_SECRET,
                    "bootstrap_admin_key": False,
                    **(auth or {}),
                },
            ),
            **top,
        )

    return factory


async def aiosqlite_threads_finished() -> None:
    """Wait, with the event loop still running, for aiosqlite's worker threads to end (call it
    once every engine is disposed: an open connection's thread runs until it closes). After
    a failed connect aiosqlite posts the end of its thread to the loop from that thread; if
    the test's loop is closed first, the thread dies with "Event loop is closed", and pytest
    blames whichever test runs then."""
    workers = [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]
    for worker in workers:
        await asyncio.to_thread(worker.join, 5.0)


AppFactory = Callable[..., Any]


@pytest.fixture
async def app_factory(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> AsyncIterator[Callable[..., Any]]:
    """Start apps (lifespan included) with custom settings; all are shut down after the test."""
    stack: list[Any] = []

    async def start(**overrides: Any) -> FastAPI:
        app = create_app(make_settings(**overrides))
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        stack.append(context)
        if app.state.settings.auth.mode == "enabled":
            # What `client_for` authenticates with: a real key of a fresh user.
            app.state.test_api_key = await issue_key(app)
        return app

    yield start
    for context in reversed(stack):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def app(app_factory: Callable[..., Any]) -> FastAPI:
    created: FastAPI = await app_factory()
    return created


async def issue_key(
    app: FastAPI, *, user: str | None = None, scope: KeyScope = KeyScope.USER, **limits: Any
) -> str:
    """A new key, stored through the auth service in the app's database; returns the secret."""
    async with app.state.sessionmaker.begin() as session:
        issued = await auth_service.create_key(
            session,
            user=user or f"user-{uuid.uuid4().hex[:12]}",
            name="test key",
            scope=scope,
            server_secret=app.state.settings.auth.server_secret.get_secret_value(),
            **limits,
        )
    return issued.secret


def client_for(app: FastAPI, key: str | None = None) -> httpx.AsyncClient:
    """A client on `app`, authenticated with `key`, or with the app's test key if it has one."""
    key = key or getattr(app.state, "test_api_key", None)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://testserver",
        timeout=30,
        headers={"Authorization": f"Bearer {key}"} if key else None,
    )


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as http:
        yield http


async def create_conversation(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/api/v1/conversations", json=body or None)
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    uuid.UUID(conversation_id)
    return conversation_id


async def count_rows(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(text(f"SELECT count(*) FROM {table}"))
    return int(value or 0)


# The real-process fixture (`start_server`) lives in tests/servers.py; importing it here makes
# it available to every test. Last, because that module imports from this one.
from tests.servers import KEYS, ServerFactory, start_server  # noqa: E402, F401
