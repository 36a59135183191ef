"""Prepared hot-path statements and their transactions (`chatbot_api.sql`), on both backends:
the same rows and the same SQLAlchemy exceptions whichever way a statement runs, commit and
rollback as declared, and a connection killed under the pool retried once, transparently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, cast

import pytest
from sqlalchemy import Table, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID
from chatbot_api.chat import statements as chat_statements
from chatbot_api.config import DatabaseSettings
from chatbot_api.conversations import service as conversations_service
from chatbot_api.conversations.models import Conversation
from chatbot_api.db import create_engine, create_sessionmaker, utcnow
from chatbot_api.sql import Prepared, Tx, run_transaction
from tests.conftest import count_rows

conversations = cast(Table, Conversation.__table__)
POSTGRESQL: Any = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]
SQLITE: Any = sqlite.dialect()
INSERT = Prepared(
    insert(conversations).values(
        id=bindparam("p_id"),
        owner_id=bindparam("p_owner"),
        title=bindparam("p_title"),
        next_seq=1,
        created_at=bindparam("p_now"),
        updated_at=bindparam("p_now"),
    )
)
TITLE = Prepared(select(conversations.c.title).where(conversations.c.id == bindparam("p_id")))


def prepared_in(module: ModuleType) -> list[tuple[str, Prepared]]:
    return [(name, value) for name, value in vars(module).items() if isinstance(value, Prepared)]


async def insert_conversation(tx: Tx, conversation_id: uuid.UUID, title: str = "t") -> None:
    await tx.run(
        INSERT,
        {
            "p_id": conversation_id,
            "p_owner": LOCAL_PRINCIPAL_ID,
            "p_title": title,
            "p_now": utcnow(),
        },
    )


@pytest.fixture
async def app_engine(db_url: str, engine: AsyncEngine) -> Any:
    """An engine built the app's way (`db.create_engine`); `engine` empties the tables."""
    built = create_engine(DatabaseSettings(_env_file=None, url=db_url, pool_size=2))
    yield built
    await built.dispose()


class TestPrepared:
    @pytest.mark.parametrize("dialect", [POSTGRESQL, SQLITE])
    def test_every_hot_statement_compiles_on_both_backends(self, dialect: Any) -> None:
        statements = prepared_in(chat_statements) + prepared_in(conversations_service)

        for name, statement in statements:
            compiled = statement.compiled(dialect)
            assert compiled.sql, name
            assert len(compiled.names) == len(compiled.processors), name

        assert len(statements) >= 15

    def test_a_column_default_left_to_sqlalchemy_is_refused(self) -> None:
        # `updated_at` has onupdate=utcnow: on the driver it would be written as NULL.
        renew = Prepared(update(conversations).values(busy_until=None))

        with pytest.raises(ValueError, match="updated_at"):
            renew.compiled(POSTGRESQL)


class TestRunTransaction:
    async def test_work_is_committed_and_rows_unpack_as_tuples(
        self, app_engine: AsyncEngine
    ) -> None:
        conversation_id = uuid.uuid4()

        async def work(tx: Tx) -> tuple[Any, ...]:
            await insert_conversation(tx, conversation_id, "hello")
            rows = await tx.all(TITLE, {"p_id": conversation_id})
            first = await tx.first(TITLE, {"p_id": conversation_id})
            assert first is not None
            return (*rows[0], *first)

        assert await run_transaction(app_engine, work) == ("hello", "hello")
        missing = await run_transaction(
            app_engine, lambda tx: tx.first(TITLE, {"p_id": uuid.uuid4()})
        )
        assert missing is None
        assert await count_rows(app_engine, "conversations") == 1

    async def test_an_error_rolls_everything_back(self, app_engine: AsyncEngine) -> None:
        async def work(tx: Tx) -> None:
            await insert_conversation(tx, uuid.uuid4())
            raise LookupError("after the first statement")

        with pytest.raises(LookupError):
            await run_transaction(app_engine, work)

        assert await count_rows(app_engine, "conversations") == 0

    async def test_a_duplicate_is_sqlalchemys_integrity_error(
        self, app_engine: AsyncEngine
    ) -> None:
        conversation_id = uuid.uuid4()
        await run_transaction(app_engine, lambda tx: insert_conversation(tx, conversation_id))

        with pytest.raises(IntegrityError):
            await run_transaction(app_engine, lambda tx: insert_conversation(tx, conversation_id))
        with pytest.raises(IntegrityError):
            await run_transaction(
                app_engine,
                lambda tx: insert_conversation(tx, conversation_id),
                single_statement=True,
            )
        assert await count_rows(app_engine, "conversations") == 1

    async def test_a_single_statement_commits_on_its_own(self, app_engine: AsyncEngine) -> None:
        await run_transaction(
            app_engine, lambda tx: insert_conversation(tx, uuid.uuid4()), single_statement=True
        )

        assert await count_rows(app_engine, "conversations") == 1


BACKEND_PID = Prepared(select(text("pg_backend_pid()")))


async def backend_pid(tx: Tx) -> int:
    row = await tx.first(BACKEND_PID)
    assert row is not None
    pid: int = row[0]
    return pid


async def orm_backend_pid(engine: AsyncEngine) -> int:
    """The same through an ORM session, as the routes that read and delete run."""
    async with create_sessionmaker(engine)() as session:
        pid: int = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return pid


async def terminate(engine: AsyncEngine, pid: int) -> None:
    """What a PostgreSQL restart does to a connection, done to one alone."""
    async with engine.begin() as admin:
        await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def killed_once(engine: AsyncEngine, calls: list[int]) -> Callable[[Tx], Awaitable[None]]:
    """Work whose first run has its connection killed between two statements."""

    async def work(tx: Tx) -> None:
        calls.append(1)
        pid = await backend_pid(tx)
        if len(calls) == 1:
            await terminate(engine, pid)
        await insert_conversation(tx, uuid.uuid4())

    return work


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
class TestTheKeptConnection:
    """On a pool of 2 + 1 overflow, ordinary work holds at most two connections at once."""

    @pytest.fixture
    async def small_pool(self, db_url: str, engine: AsyncEngine) -> Any:
        built = create_engine(
            DatabaseSettings(
                _env_file=None, url=db_url, pool_size=2, max_overflow=1, pool_timeout=0.3
            )
        )
        yield built
        await built.dispose()

    @staticmethod
    async def holding(small_pool: AsyncEngine, release: asyncio.Event) -> list[asyncio.Task[None]]:
        """Two ordinary transactions that hold their connection until `release` is set."""
        started = asyncio.Semaphore(0)

        async def hold(tx: Tx) -> None:
            await insert_conversation(tx, uuid.uuid4())
            started.release()
            await release.wait()

        tasks = [asyncio.create_task(run_transaction(small_pool, hold)) for _ in range(2)]
        for _ in tasks:
            await asyncio.wait_for(started.acquire(), 5.0)
        return tasks

    async def test_urgent_work_runs_while_ordinary_work_waits_for_a_place(
        self, small_pool: AsyncEngine
    ) -> None:
        release = asyncio.Event()
        held = await self.holding(small_pool, release)
        third = asyncio.create_task(run_transaction(small_pool, backend_pid))
        await asyncio.sleep(0.1)
        assert not third.done()
        assert small_pool.sync_engine.pool.checkedout() == 2  # type: ignore[attr-defined]

        urgent = await asyncio.wait_for(run_transaction(small_pool, backend_pid, urgent=True), 1.0)

        assert isinstance(urgent, int)
        release.set()
        await asyncio.gather(*held)
        assert isinstance(await third, int)

    async def test_ordinary_work_without_a_place_in_time_is_a_pool_timeout(
        self, small_pool: AsyncEngine
    ) -> None:
        release = asyncio.Event()
        held = await self.holding(small_pool, release)

        with pytest.raises(PoolTimeoutError, match=r"within 0\.3 s"):
            await run_transaction(small_pool, backend_pid)

        release.set()
        await asyncio.gather(*held)
        assert await count_rows(small_pool, "conversations") == 2

    async def test_orm_sessions_wait_for_a_place_and_leave_the_kept_connection(
        self, small_pool: AsyncEngine
    ) -> None:
        sessions = create_sessionmaker(small_pool)
        async with sessions() as first, sessions() as second:
            await first.execute(text("SELECT 1"))  # each now holds a connection (and a place)
            await second.execute(text("SELECT 1"))
            assert small_pool.sync_engine.pool.checkedout() == 2  # type: ignore[attr-defined]

            async with sessions() as third:
                with pytest.raises(PoolTimeoutError, match=r"within 0\.3 s"):
                    await third.execute(text("SELECT 1"))
            # The kept connection is still there for a reply to be stored.
            urgent = await asyncio.wait_for(
                run_transaction(small_pool, backend_pid, urgent=True), 1.0
            )
            assert isinstance(urgent, int)

        # Checked in, the sessions' connections gave their places back.
        async with sessions() as first, sessions() as second:
            assert (await first.execute(text("SELECT 1"))).scalar() == 1
            assert (await second.execute(text("SELECT 1"))).scalar() == 1

    async def test_urgent_work_runs_while_orm_sessions_wait_for_a_place(
        self, small_pool: AsyncEngine
    ) -> None:
        release = asyncio.Event()
        held = await self.holding(small_pool, release)
        waiting = asyncio.create_task(orm_backend_pid(small_pool))
        await asyncio.sleep(0.1)
        assert not waiting.done()

        assert isinstance(
            await asyncio.wait_for(run_transaction(small_pool, backend_pid, urgent=True), 1.0),
            int,
        )
        release.set()
        await asyncio.gather(*held)
        assert isinstance(await waiting, int)

    async def test_a_failed_checkout_gives_its_place_back(self, db_url: str) -> None:
        # Nothing listens on port 1: every connect fails at once. Had the first failure kept
        # its place (the pool of 1 + 1 has one), the next would be a pool timeout instead.
        unreachable = create_engine(
            DatabaseSettings(
                _env_file=None,
                url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
                pool_size=1,
                max_overflow=1,
                pool_timeout=0.3,
            )
        )
        try:
            for _ in range(3):
                # A refused connect is the bare OSError (`errors` answers it with a 503).
                with pytest.raises(OSError, match="Connect call failed"):
                    await run_transaction(unreachable, backend_pid)
        finally:
            await unreachable.dispose()

    async def test_a_pool_of_one_keeps_nothing_back(self, db_url: str) -> None:
        single = create_engine(
            DatabaseSettings(
                _env_file=None, url=db_url, pool_size=1, max_overflow=0, pool_timeout=0.3
            )
        )
        try:
            assert isinstance(await run_transaction(single, backend_pid), int)
            async with create_sessionmaker(single)() as session:
                assert (await session.execute(text("SELECT 1"))).scalar() == 1
        finally:
            await single.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
class TestDeadConnections:
    async def test_a_connection_closed_by_the_server_is_not_handed_out(
        self, app_engine: AsyncEngine, engine: AsyncEngine
    ) -> None:
        pid = await run_transaction(app_engine, backend_pid)
        await terminate(engine, pid)
        await asyncio.sleep(0.2)  # asyncpg reads the server's goodbye while idle

        # The checkout hook sees asyncpg's closed connection and the pool opens another.
        conversation_id = uuid.uuid4()
        await run_transaction(app_engine, lambda tx: insert_conversation(tx, conversation_id))

        assert await count_rows(app_engine, "conversations") == 1
        assert await run_transaction(app_engine, backend_pid) != pid

    async def test_a_connection_that_dies_mid_transaction_is_retried_once(
        self, app_engine: AsyncEngine, engine: AsyncEngine
    ) -> None:
        calls: list[int] = []

        await run_transaction(app_engine, killed_once(engine, calls))

        assert len(calls) == 2
        assert await count_rows(app_engine, "conversations") == 1

    async def test_a_single_statement_is_not_retried(
        self, app_engine: AsyncEngine, engine: AsyncEngine
    ) -> None:
        calls: list[int] = []

        with pytest.raises(DBAPIError) as raised:
            await run_transaction(app_engine, killed_once(engine, calls), single_statement=True)

        assert raised.value.connection_invalidated
        assert len(calls) == 1
        assert await count_rows(app_engine, "conversations") == 0

    async def test_a_transaction_cut_by_a_cancel_leaves_no_transaction_open_in_the_pool(
        self, app_engine: AsyncEngine, engine: AsyncEngine
    ) -> None:
        async def slow(tx: Tx) -> None:
            await insert_conversation(tx, uuid.uuid4())
            await tx.run(Prepared(select(text("pg_sleep(5)"))))

        cut = asyncio.create_task(run_transaction(app_engine, slow))
        await asyncio.sleep(0.5)
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut

        # Whichever connection the pool hands out next, its work is really committed.
        for _ in range(3):
            await run_transaction(app_engine, lambda tx: insert_conversation(tx, uuid.uuid4()))
        assert await count_rows(engine, "conversations") == 3
