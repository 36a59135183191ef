"""Database plumbing: the declarative `Base`, portable column types, the engine factory and
the per-request unit of work (`SessionDep`).

Lifetimes: the engine and sessionmaker are created in the app's lifespan (`main.py`) and
stored on `app.state`; nothing connects at import time. A request-scoped session commits when
the endpoint returns and rolls back if it raised, *before* the response is sent, so a client
never sees a 2xx for a write that did not commit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy import JSON, DateTime, MetaData, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from chatbot_api.config import DatabaseSettings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every backend. SQLite stores no offset, so values read
    back from it are naive; they were written as UTC and are re-labelled as such here."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}  # noqa: RUF012


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    """The engine for `settings.url`, with bounded pool and connect timeouts.

    No `pool_pre_ping`: it costs a round trip on every checkout, as much CPU as a statement.
    A connection that died with a database restart fails its first statement instead; then
    SQLAlchemy invalidates the whole pool (every older connection reconnects), and
    `run_transaction` retries the work once on a fresh connection, so the hot paths see no
    error. On SQLite, WAL lets readers run beside the single writer, and `busy_timeout` makes a
    writer wait for the lock instead of failing at once.
    """
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.url,
            echo=settings.echo,
            connect_args={"timeout": settings.connect_timeout},
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(settings.connect_timeout * 1000)}")
            cursor.close()

        return engine
    return create_async_engine(
        settings.url,
        echo=settings.echo,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=1800,
        connect_args={"timeout": settings.connect_timeout, "command_timeout": 30},
    )


T = TypeVar("T")


async def run_transaction(
    engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]
) -> T:
    """`work(conn)` in one transaction, committed if it returns. If the pooled connection
    turns out to be dead (the database restarted since it was last used), the work is run
    once more on a new connection: nothing was committed, since the failure came before the
    COMMIT. A failure of the COMMIT itself is never retried (its outcome is unknown)."""
    for attempt in range(2):
        committing = False
        try:
            async with engine.connect() as conn, conn.begin():
                result = await work(conn)
                committing = True  # leaving the block commits
            return result
        except DBAPIError as exc:
            if attempt == 0 and exc.connection_invalidated and not committing:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


# scope="function": commit when the endpoint returns, before the response goes out.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as connection:
        yield connection


# The same unit of work without the ORM, for the routes on the hot path (SQLAlchemy Core).
ConnectionDep = Annotated[AsyncConnection, Depends(get_connection, scope="function")]
