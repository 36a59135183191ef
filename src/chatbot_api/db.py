"""Database plumbing: the declarative `Base`, portable column types, the engine factory and
the per-request unit of work (`SessionDep`).

Lifetimes: the engine and sessionmaker are created in the app's lifespan (`main.py`) and
stored on `app.state`; nothing connects at import time. A request-scoped session commits when
the endpoint returns and rolls back if it raised, *before* the response is sent, so a client
never sees a 2xx for a write that did not commit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from pydantic import BaseModel
from sqlalchemy import JSON, DateTime, MetaData, event, make_url
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from chatbot_api.config import DatabaseSettings
from chatbot_api.pool import KeepOneForUrgentWork

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
    A PostgreSQL restart closes every connection's socket, which asyncpg notices while idle,
    so the checkout hook below drops a closed connection for free and the pool hands out
    another (SQLAlchemy's documented "pessimistic" disconnect handling, without the ping). A
    break noticed only mid-transaction is retried by `sql.run_transaction`. One of the pool's
    connections is kept for storing replies (`pool.KeepOneForUrgentWork`).

    On SQLite, WAL lets readers run beside the single writer, and `busy_timeout` makes a
    writer wait for the lock instead of failing at once. A database file gets the pool's
    size, overflow and timeout too: SQLAlchemy's default there would open up to 10 overflow
    connections, each closed on check-in, and each a thread of its own (aiosqlite) with four
    PRAGMAs. (An in-memory database keeps SQLAlchemy's one shared connection.)
    """
    if settings.is_sqlite:
        in_memory = make_url(settings.url).database in (None, "", ":memory:")
        pool: dict[str, Any] = (
            {}
            if in_memory
            else {
                "pool_size": settings.pool_size,
                "max_overflow": settings.max_overflow,
                "pool_timeout": settings.pool_timeout,
            }
        )
        engine = create_async_engine(
            settings.url,
            echo=settings.echo,
            connect_args={"timeout": settings.connect_timeout},
            **pool,
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
    engine = create_async_engine(
        settings.url,
        echo=settings.echo,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=1800,
        poolclass=KeepOneForUrgentWork,
        connect_args={"timeout": settings.connect_timeout, "command_timeout": 30},
    )

    @event.listens_for(engine.sync_engine, "checkout")
    def _drop_closed(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if getattr(driver, "is_closed", None) is not None and driver.is_closed():
            raise DisconnectionError("the connection was closed by the server")

    return engine


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


async def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


# For the routes on the hot path, which run `sql.Prepared` statements (`sql.run_transaction`).
EngineDep = Annotated[AsyncEngine, Depends(_engine)]


def model_response(
    model: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response serialised once, by pydantic-core. Returning the model would have
    FastAPI validate it against `response_model` all over again first."""
    return Response(model.model_dump_json(), status_code, headers, media_type="application/json")
