"""The first start: an admin key printed once (with a curl line), created by one process only
however many start together; and the migration that gives pre-auth conversations an owner."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from io import StringIO
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chatbot_api import migrate
from chatbot_api.auth.bootstrap import bootstrap
from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID
from chatbot_api.config import AuthSettings, DatabaseSettings, LLMSettings, Settings
from chatbot_api.db import create_engine, create_sessionmaker
from chatbot_api.main import create_app
from chatbot_api.testing.fake_llm import FakeLLM
from tests.conftest import (
    FAKE_KEY,
    PG_SERVER,
    TEST_SERVER_SECRET,
    client_for,
    drop_pg_database,
    pg_url,
    recreate_pg_database,
)

KEY = re.compile(r"cbk_[0-9A-Za-z]{43}")


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database, migrated to head, that no other test touches."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        await asyncio.to_thread(migrate.upgrade, url)
        yield url
        return
    name = f"chatbot_auth_{uuid.uuid4().hex[:12]}"
    try:
        await recreate_pg_database(name)
    except OSError as exc:
        pytest.fail(f"PostgreSQL is required at {PG_SERVER}: {exc}")
    url = "postgresql+asyncpg://" + pg_url(name).split("://", 1)[1]
    await asyncio.to_thread(migrate.upgrade, url)
    yield url
    await drop_pg_database(name)


def settings_for(url: str, fake_llm: FakeLLM) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        db=DatabaseSettings(_env_file=None, url=url),
        llm=LLMSettings(
            _env_file=None,
            provider="openai",
            base_url=fake_llm.base_url,
            api_key=SecretStr(FAKE_KEY),
            model="fake-model",
        ),
        auth=AuthSettings(
            _env_file=None,
            server_secret=SecretStr(TEST_SERVER_SECRET),
            public_url="http://api.test:8000",
        ),
    )


async def count(url: str, table: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return int(await connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
    finally:
        await engine.dispose()


class TestFirstStart:
    async def test_prints_a_working_admin_key_once_with_a_curl_line(
        self,
        fresh_url: str,
        fake_llm: FakeLLM,
        capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        app = create_app(settings_for(fresh_url, fake_llm))
        async with app.router.lifespan_context(app):
            printed = capsys.readouterr().out
            secret = KEY.search(printed)
            assert secret is not None
            async with client_for(app, secret.group(0)) as admin:
                keys = await admin.get("/api/v1/admin/keys")
        again = create_app(settings_for(fresh_url, fake_llm))
        async with again.router.lifespan_context(again):
            printed_again = capsys.readouterr().out

        assert (
            f'curl -H "Authorization: Bearer {secret.group(0)}" '
            "http://api.test:8000/api/v1/conversations"
        ) in printed
        assert "http://api.test:8000/docs" in printed
        assert keys.status_code == 200
        assert [k["scope"] for k in keys.json()["data"]] == ["admin"]
        assert printed_again == ""
        assert secret.group(0) not in caplog.text
        assert await count(fresh_url, "api_keys") == 1

    async def test_many_processes_starting_at_once_create_one_key(self, fresh_url: str) -> None:
        # Each "process" has its own engine, as separate workers would.
        engines = [create_engine(DatabaseSettings(_env_file=None, url=fresh_url)) for _ in range(6)]
        outputs = [StringIO() for _ in engines]
        try:
            created = await asyncio.gather(
                *(
                    bootstrap(
                        create_sessionmaker(engine),
                        server_secret=TEST_SERVER_SECRET,
                        base_url="http://127.0.0.1:8000",
                        create_admin_key=True,
                        out=out,
                    )
                    for engine, out in zip(engines, outputs, strict=True)
                )
            )
        finally:
            for engine in engines:
                await engine.dispose()

        assert created.count(True) == 1
        assert sum(bool(KEY.search(out.getvalue())) for out in outputs) == 1
        assert await count(fresh_url, "api_keys") == 1

    async def test_disabled_auth_or_bootstrap_off_creates_no_key(
        self, fresh_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        engine = create_engine(DatabaseSettings(_env_file=None, url=fresh_url))
        try:
            made = await bootstrap(
                create_sessionmaker(engine),
                server_secret=TEST_SERVER_SECRET,
                base_url="http://127.0.0.1:8000",
                create_admin_key=False,
            )
        finally:
            await engine.dispose()

        assert made is False
        assert capsys.readouterr().out == ""
        assert await count(fresh_url, "api_keys") == 0


class TestMigration:
    @pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
    async def test_conversations_from_before_auth_are_owned_by_the_local_principal(
        self, backend: str, tmp_path: Path
    ) -> None:
        if backend == "sqlite":
            url, name = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}", None
        else:
            name = f"chatbot_auth_{uuid.uuid4().hex[:12]}"
            await recreate_pg_database(name)
            url = "postgresql+asyncpg://" + pg_url(name).split("://", 1)[1]
        try:
            await asyncio.to_thread(migrate.upgrade, url, "c3f1d8e6a2b4")
            engine = create_async_engine(url)
            old_id = uuid.uuid4()
            async with engine.begin() as connection:
                await connection.execute(
                    text(
                        "INSERT INTO conversations (id, next_seq, created_at, updated_at) "
                        "VALUES (:id, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"id": old_id.hex if backend == "sqlite" else old_id},
                )
            await asyncio.to_thread(migrate.upgrade, url)
            async with engine.connect() as connection:
                owner = await connection.scalar(text("SELECT owner_id FROM conversations"))
                local = await connection.scalar(
                    text("SELECT name FROM principals WHERE name = 'local'")
                )
            await engine.dispose()
            await asyncio.to_thread(migrate.downgrade, url, "c3f1d8e6a2b4")
            engine = create_async_engine(url)
            async with engine.connect() as connection:
                kept = await connection.scalar(text("SELECT count(*) FROM conversations"))
            await engine.dispose()
        finally:
            if name is not None:
                await drop_pg_database(name)

        assert str(owner).replace("-", "") == LOCAL_PRINCIPAL_ID.hex
        assert local == "local"
        assert kept == 1
