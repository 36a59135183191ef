"""Prepared statements and transactions for the hot path (a chat turn, a new conversation).

SQLAlchemy Core stays the single source of the SQL: each `Prepared` wraps a Core statement,
built once at import. What changes is how it runs. Through `Connection.execute`, SQLAlchemy
spends more CPU per statement than asyncpg itself (cache lookup, execution context, parameter
and result processing, a greenlet switch): on this service's turn, 1.4 ms of SQLAlchemy for
1.7 ms of driver work. So on PostgreSQL a `Prepared` is compiled once by SQLAlchemy's asyncpg
dialect (its SQL, parameter order and bind processors are kept) and run straight on the
asyncpg connection that SQLAlchemy's pool checked out, inside an asyncpg transaction. On any
other backend (SQLite) it runs through SQLAlchemy as usual. Both give rows that unpack as
tuples; both raise SQLAlchemy's exceptions (`_translate`), so callers and the error handlers
see one behaviour.

On PostgreSQL the pool keeps one connection for urgent work: storing a reply whose tokens
were already sent, and the checkpointer (`run_transaction(..., urgent=True)`). Everything
else, here (a turn starting, an API-key lookup, a new conversation, a cancel) or through ORM
sessions (`db.SessionDep`: listing, reading, deleting), holds at most all but one of the
pool's connections, so under a surge the backlog of new work waits for a place
(`pool.KeepOneForUrgentWork`), not in the pool's FIFO queue ahead of replies to store.

Only statements whose SQL is fixed can be prepared: no `in_()` lists (expanded at execution),
no multi-row `.values()` (executemany instead), and every column with a Python-side default
(`default=`, `onupdate=`) set explicitly (checked when the statement is compiled). Anything
else uses `AsyncConnection`.

    async def work(tx: Tx) -> ...:
        row = await tx.first(CLAIM, {"p_id": ...})
    await run_transaction(engine, work)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import Executable
from sqlalchemy.util import greenlet_spawn

from chatbot_api.pool import checkout_urgently

T = TypeVar("T")
Params = Mapping[str, Any]
Row = Sequence[Any]
_NO_PARAMS: Params = {}


class _Compiled:
    """A statement's SQL for one dialect, and how to turn named parameters into its
    positional arguments (defaults for the constants, the dialect's bind processors)."""

    __slots__ = ("defaults", "names", "processors", "sql")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        prefetch = [c.name for c in (*compiled.insert_prefetch, *compiled.update_prefetch)]
        if prefetch:
            # SQLAlchemy computes these Python-side defaults (`default=`, `onupdate=`) at
            # execution; run on the driver they would silently be NULL. Set them explicitly.
            raise ValueError(f"a prepared statement must set {', '.join(prefetch)} itself")
        self.sql: str = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.defaults: dict[str, Any] = dict(compiled.params)
        self.processors = tuple(compiled.binds[n].type.bind_processor(dialect) for n in self.names)

    def args(self, params: Params) -> list[Any]:
        out = []
        for name, process in zip(self.names, self.processors, strict=True):
            value = params[name] if name in params else self.defaults[name]
            out.append(value if process is None or value is None else process(value))
        return out


class Prepared:
    """A Core statement with fixed SQL, compiled at its first run on each dialect."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            found = self._compiled[dialect.name] = _Compiled(self.statement, dialect)
        return found


class Tx(Protocol):
    """One transaction of the hot path. Rows unpack as tuples.

    `combines_writes` is True where several writes can be one statement (PostgreSQL runs
    an UPDATE inside a WITH; SQLite does not): work that uses such a statement then runs as
    `single_statement`, one round trip with no BEGIN or COMMIT."""

    combines_writes: bool

    async def all(self, statement: Prepared, params: Params = _NO_PARAMS) -> Sequence[Row]: ...

    async def first(self, statement: Prepared, params: Params = _NO_PARAMS) -> Row | None: ...

    async def run(self, statement: Prepared, params: Params = _NO_PARAMS) -> None: ...

    async def run_many(self, statement: Prepared, params: Sequence[Params]) -> None: ...


class _CoreTx:
    """Through SQLAlchemy: every backend but PostgreSQL."""

    __slots__ = ("_conn",)
    combines_writes = False

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def all(self, statement: Prepared, params: Params = _NO_PARAMS) -> Sequence[Row]:
        return (await self._conn.execute(statement.statement, params)).all()

    async def first(self, statement: Prepared, params: Params = _NO_PARAMS) -> Row | None:
        return (await self._conn.execute(statement.statement, params)).first()

    async def run(self, statement: Prepared, params: Params = _NO_PARAMS) -> None:
        await self._conn.execute(statement.statement, params)

    async def run_many(self, statement: Prepared, params: Sequence[Params]) -> None:
        if params:
            await self._conn.execute(statement.statement, list(params))


class _AsyncpgTx:
    """Straight on the asyncpg connection (its own statement cache prepares each SQL once)."""

    __slots__ = ("_dialect", "_driver")
    combines_writes = True

    def __init__(self, driver: asyncpg.Connection, dialect: Dialect) -> None:
        self._driver = driver
        self._dialect = dialect

    async def all(self, statement: Prepared, params: Params = _NO_PARAMS) -> Sequence[Row]:
        compiled = statement.compiled(self._dialect)
        try:
            rows: list[Row] = await self._driver.fetch(compiled.sql, *compiled.args(params))
        except Exception as exc:
            raise _translate(exc, compiled.sql, self._driver) from exc
        return rows

    async def first(self, statement: Prepared, params: Params = _NO_PARAMS) -> Row | None:
        compiled = statement.compiled(self._dialect)
        try:
            row: Row | None = await self._driver.fetchrow(compiled.sql, *compiled.args(params))
        except Exception as exc:
            raise _translate(exc, compiled.sql, self._driver) from exc
        return row

    async def run(self, statement: Prepared, params: Params = _NO_PARAMS) -> None:
        compiled = statement.compiled(self._dialect)
        try:
            await self._driver.execute(compiled.sql, *compiled.args(params))
        except Exception as exc:
            raise _translate(exc, compiled.sql, self._driver) from exc

    async def run_many(self, statement: Prepared, params: Sequence[Params]) -> None:
        if not params:
            return
        compiled = statement.compiled(self._dialect)
        try:
            await self._driver.executemany(compiled.sql, [compiled.args(p) for p in params])
        except Exception as exc:
            raise _translate(exc, compiled.sql, self._driver) from exc


def _translate(exc: Exception, sql: str, driver: asyncpg.Connection) -> Exception:
    """asyncpg's exceptions as SQLAlchemy's, as `Connection.execute` would have raised them:
    a unique violation is an `IntegrityError`, and a broken connection a `DBAPIError` with
    `connection_invalidated` (the caller invalidates it; see `run_transaction`). asyncpg's
    `InternalClientError` means its protocol state is lost: the connection is never reused."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, None, exc)
    if isinstance(exc, asyncpg.InternalClientError):
        return DBAPIError(sql, None, exc, connection_invalidated=True)
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
        return DBAPIError(sql, None, exc, connection_invalidated=driver.is_closed())
    return exc


async def _checkout(engine: AsyncEngine, urgent: bool) -> PoolProxiedConnection:
    """A raw pool checkout (`pool.KeepOneForUrgentWork` decides who waits for a place)."""
    if not urgent:
        return await engine.raw_connection()
    with checkout_urgently():
        return await engine.raw_connection()


async def run_transaction(
    engine: AsyncEngine,
    work: Callable[[Tx], Awaitable[T]],
    *,
    single_statement: bool = False,
    urgent: bool = False,
) -> T:
    """`work(tx)` in one transaction, committed if it returns.

    `urgent=True` is for storing what clients were already sent (a finished reply, the
    checkpointer's partial replies): it may take the connection the pool keeps back
    (`pool.KeepOneForUrgentWork`). Ordinary work first waits for a place, and past the
    pool's timeout raises SQLAlchemy's pool `TimeoutError`, as the pool itself would.

    `single_statement=True` is for work that is one statement: on PostgreSQL it then runs
    without BEGIN and COMMIT (a statement is its own transaction), one round trip instead of
    three, and it is never retried (a statement that may have committed cannot be). Work
    that reads more after its one write, and needs no snapshot shared with it, may use it too
    (`chat.service.begin_turn(standalone=True)`).

    If the connection turns out to be dead (the database restarted since it was last used),
    it is invalidated and the work runs once more on another: nothing was committed, since
    the failure came before the COMMIT. A failure of the COMMIT itself is never retried (its
    outcome is unknown). The pool's checkout already drops connections it knows are closed
    (`db.create_engine`), so this is the rare case of a break noticed mid-transaction.
    """
    for attempt in range(2):
        committing = False
        try:
            if engine.dialect.driver != "asyncpg":
                async with engine.connect() as conn, conn.begin():
                    result = await work(_CoreTx(conn))
                    committing = True  # leaving the block commits
                return result
            # A raw pool checkout: no SQLAlchemy `Connection` is built around it, so a failed
            # connect comes out as the driver's error and is wrapped here as SQLAlchemy would.
            dbapi_error = engine.dialect.loaded_dbapi.Error
            try:
                pooled = await _checkout(engine, urgent)
            except dbapi_error as exc:
                raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
            driver: asyncpg.Connection = pooled.driver_connection
            broken = False
            try:
                if single_statement:
                    committing = True
                    result = await work(_AsyncpgTx(driver, engine.dialect))
                else:
                    async with driver.transaction():
                        result = await work(_AsyncpgTx(driver, engine.dialect))
                        committing = True
            except DBAPIError as exc:
                broken = exc.connection_invalidated
                raise
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                OSError,
            ) as exc:
                # BEGIN, COMMIT or ROLLBACK (statements raise SQLAlchemy's errors already).
                error = _translate(exc, "BEGIN/COMMIT", driver)
                broken = isinstance(error, DBAPIError) and error.connection_invalidated
                raise error from exc
            finally:
                # Still in a transaction here would mean its ROLLBACK could not run: such a
                # connection must not go back to the pool as it is (asyncpg does roll back a
                # cancelled one; this guards the cases it cannot).
                if broken or driver.is_closed() or driver.is_in_transaction():
                    await greenlet_spawn(pooled.invalidate)
                await greenlet_spawn(pooled.close)  # back to the pool
            return result
        except DBAPIError as exc:
            if attempt == 0 and exc.connection_invalidated and not committing:
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover
