"""Database plumbing: tz-aware timestamps on both backends, the SQLite connection setup, and
the pool under sustained load."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID
from chatbot_api.config import DatabaseSettings
from chatbot_api.conversations.models import Conversation, Message, MessageStatus
from chatbot_api.db import create_engine, create_sessionmaker
from tests.conftest import AppFactory, client_for, count_rows, create_conversation

SANTIAGO = timezone(timedelta(hours=-3))


async def store_conversation(engine: AsyncEngine, **values: object) -> uuid.UUID:
    async with create_sessionmaker(engine)() as session, session.begin():
        conversation = Conversation(**{"owner_id": LOCAL_PRINCIPAL_ID, **values})
        session.add(conversation)
    return conversation.id


async def load_conversation(engine: AsyncEngine, conversation_id: uuid.UUID) -> Conversation:
    async with create_sessionmaker(engine)() as session:
        conversation = await session.get(Conversation, conversation_id)
    assert conversation is not None
    return conversation


class TestUTCDateTime:
    async def test_default_timestamps_read_back_utc_aware(self, engine: AsyncEngine) -> None:
        conversation_id = await store_conversation(engine, title="t")

        loaded = await load_conversation(engine, conversation_id)

        assert loaded.created_at.tzinfo is UTC
        assert loaded.updated_at.tzinfo is UTC
        assert abs(datetime.now(UTC) - loaded.created_at) < timedelta(minutes=1)

    async def test_other_offsets_are_stored_as_the_same_instant_in_utc(
        self, engine: AsyncEngine
    ) -> None:
        written = datetime(2026, 3, 1, 21, 30, 15, 123456, tzinfo=SANTIAGO)
        conversation_id = await store_conversation(engine, created_at=written)

        loaded = await load_conversation(engine, conversation_id)

        assert loaded.created_at == written
        assert loaded.created_at.tzinfo is UTC
        assert (loaded.created_at.hour, loaded.created_at.day) == (0, 2)

    async def test_core_selects_are_normalised_too(self, engine: AsyncEngine) -> None:
        written = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        await store_conversation(engine, created_at=written)

        async with AsyncSession(engine) as session:
            value = await session.scalar(select(Conversation.created_at))

        assert value == written
        assert value is not None
        assert value.tzinfo is UTC

    async def test_sqlite_file_holds_the_utc_wall_clock(self, sqlite_url: str) -> None:
        engine = create_engine(DatabaseSettings(_env_file=None, url=sqlite_url))
        try:
            conversation_id = await store_conversation(
                engine, created_at=datetime(2026, 3, 1, 21, 30, tzinfo=SANTIAGO)
            )
            async with engine.connect() as connection:
                raw = await connection.scalar(
                    text("SELECT created_at FROM conversations WHERE id = :id"),
                    {"id": conversation_id.hex},
                )
                await connection.execute(text("DELETE FROM conversations"))
                await connection.commit()
        finally:
            await engine.dispose()

        assert str(raw).startswith("2026-03-02 00:30:00")

    async def test_naive_datetime_is_refused(self, engine: AsyncEngine) -> None:
        naive = datetime.now(UTC).replace(tzinfo=None)

        with pytest.raises(StatementError, match="naive datetimes are not stored"):
            await store_conversation(engine, created_at=naive)

        assert await count_rows(engine, "conversations") == 0

    async def test_naive_datetime_is_refused_in_a_filter(self, engine: AsyncEngine) -> None:
        naive = datetime.now(UTC).replace(tzinfo=None)

        async with AsyncSession(engine) as session:
            with pytest.raises(StatementError, match="naive datetimes are not stored"):
                await session.scalars(select(Conversation).where(Conversation.created_at < naive))


class TestSQLiteEngine:
    @pytest.fixture
    async def sqlite_engine(self, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
        settings = DatabaseSettings(
            _env_file=None, url=f"sqlite:///{tmp_path / 'pragmas.db'}", connect_timeout=2.5
        )
        engine = create_engine(settings)
        yield engine
        await engine.dispose()

    async def pragma(self, engine: AsyncEngine, name: str) -> object:
        async with engine.connect() as connection:
            return await connection.scalar(text(f"PRAGMA {name}"))

    async def test_plain_sqlite_url_gets_the_async_driver(self, sqlite_engine: AsyncEngine) -> None:
        assert sqlite_engine.dialect.driver == "aiosqlite"

    async def test_journal_mode_is_wal(self, sqlite_engine: AsyncEngine) -> None:
        assert await self.pragma(sqlite_engine, "journal_mode") == "wal"

    async def test_foreign_keys_are_enforced(self, sqlite_engine: AsyncEngine) -> None:
        assert await self.pragma(sqlite_engine, "foreign_keys") == 1

    async def test_busy_timeout_follows_the_connect_timeout(
        self, sqlite_engine: AsyncEngine
    ) -> None:
        assert await self.pragma(sqlite_engine, "busy_timeout") == 2500

    async def test_synchronous_is_normal(self, sqlite_engine: AsyncEngine) -> None:
        # 1 = NORMAL: safe with WAL, and much faster than FULL.
        assert await self.pragma(sqlite_engine, "synchronous") == 1

    async def test_every_pooled_connection_gets_the_pragmas(
        self, sqlite_engine: AsyncEngine
    ) -> None:
        async with sqlite_engine.connect() as first, sqlite_engine.connect() as second:
            values = [
                await connection.scalar(text("PRAGMA foreign_keys"))
                for connection in (first, second)
            ]

        assert values == [1, 1]

    async def test_message_for_a_missing_conversation_is_refused(self, sqlite_url: str) -> None:
        engine = create_engine(DatabaseSettings(_env_file=None, url=sqlite_url))
        try:
            async with create_sessionmaker(engine)() as session:
                session.add(
                    Message(
                        conversation_id=uuid.uuid4(),
                        seq=1,
                        role="user",
                        content="orphan",
                        status=MessageStatus.COMPLETED,
                    )
                )
                with pytest.raises(IntegrityError, match="FOREIGN KEY"):
                    await session.commit()
            assert await count_rows(engine, "messages") == 0
        finally:
            await engine.dispose()


class TestPool:
    """Load above the pool's size waits for its connections; by default it does not open and
    close connections (SQLAlchemy closes an overflow connection when it is checked in to a
    full pool, so every burst past `pool_size` opened new ones: PostgreSQL sessions, or
    SQLite connections with a thread each)."""

    ROUNDS = 3
    CONCURRENT = 24  # sends at once, well over the default pool of 5

    async def sessions_opened_after_warm_up(self, app_factory: AppFactory, **db: int) -> int:
        """Database connections the app opened over ROUNDS rounds of CONCURRENT sends at
        once, after a first round has warmed the pool up."""
        app = await app_factory(db=db)
        opened = 0

        def count(*_: object) -> None:
            nonlocal opened
            opened += 1

        event.listen(app.state.engine.sync_engine, "connect", count)
        async with client_for(app) as http:
            ids = [await create_conversation(http) for _ in range(self.CONCURRENT)]

            async def round_of_sends() -> None:
                sent = await asyncio.gather(
                    *(
                        http.post(f"/api/v1/conversations/{cid}/messages", json={"message": "hi"})
                        for cid in ids
                    )
                )
                assert [r.status_code for r in sent] == [200] * len(ids)

            await round_of_sends()
            warm = opened
            for _ in range(self.ROUNDS):
                await round_of_sends()
        return opened - warm

    async def test_the_default_pool_opens_no_sessions_under_sustained_load(
        self, app_factory: AppFactory
    ) -> None:
        assert DatabaseSettings(_env_file=None).max_overflow == 0
        assert await self.sessions_opened_after_warm_up(app_factory) == 0

    async def test_an_overflow_opens_sessions_again_on_every_burst(
        self, app_factory: AppFactory
    ) -> None:
        """What the default avoids, and proof that the count above sees new sessions."""
        assert await self.sessions_opened_after_warm_up(app_factory, max_overflow=5) >= self.ROUNDS
