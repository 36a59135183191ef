"""The connection pool that keeps one connection for urgent work, whoever else checks out.

Storing a reply whose tokens were already sent, and the checkpointer's partial replies, must
not wait behind a surge of new work. So on PostgreSQL every checkout of the engine's pool
takes a *place* first, and there is one place fewer than connections: ordinary work (a turn
starting, an API-key lookup, an ORM session listing conversations) holds at most all but one
connection at a time, and the last one is free for urgent work (`checkout_urgently`), which
takes no place. A place is taken before the pool is asked for a connection and given back
when that connection is checked in, so the gate holds whatever path the checkout came by:
`sql.run_transaction`, an `AsyncSession`, `engine.connect()`.

Waiting for a place longer than the pool's timeout raises the pool's own `TimeoutError`, so
callers see one error for "no connection in time" either way. A pool of one connection (or
one without a limit) keeps nothing back.

A task that already holds a connection and asks for a second one takes a second place, as it
would take a second connection from a plain pool; when every place is held that way, the
waits end in pool timeouts, as they would on the plain pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import await_

_urgent: ContextVar[bool] = ContextVar("chatbot_api_urgent_checkout", default=False)


@contextlib.contextmanager
def checkout_urgently() -> Iterator[None]:
    """Checkouts made inside the block (by this task) may take the kept connection."""
    token = _urgent.set(True)
    try:
        yield
    finally:
        _urgent.reset(token)


class KeepOneForUrgentWork(AsyncAdaptedQueuePool):
    """`AsyncAdaptedQueuePool` with a gate of `pool_size + max_overflow - 1` places in front
    of every checkout that is not urgent (`checkout_urgently`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        capacity = self.size() + self._max_overflow
        # An unbounded pool (`max_overflow=-1`) needs no gate; a pool of one keeps nothing.
        self._places = (
            asyncio.Semaphore(capacity - 1) if self._max_overflow >= 0 and capacity > 1 else None
        )
        # The connections checked out with a place, which they give back at check-in.
        self._placed: set[ConnectionPoolEntry] = set()

    async def _take_place(self, places: asyncio.Semaphore) -> None:
        if not places.locked():
            await places.acquire()  # free: returns without suspending (and no timer to set)
            return
        try:
            async with asyncio.timeout(self._timeout):
                await places.acquire()
        except TimeoutError:
            raise PoolTimeoutError(
                f"no connection for ordinary work within {self._timeout:g} s "
                "(one is kept for storing replies)"
            ) from None

    def _do_get(self) -> ConnectionPoolEntry:
        places = self._places
        if places is None or _urgent.get():
            return super()._do_get()
        # Runs in SQLAlchemy's greenlet (the async engine's checkouts all do): `await_` waits
        # on the event loop.
        await_(self._take_place(places))
        # QueuePool's `_do_get` calls itself again when it loses a race for the overflow:
        # that call must not take a second place.
        token = _urgent.set(True)
        try:
            record = super()._do_get()
        except BaseException:
            places.release()
            raise
        finally:
            _urgent.reset(token)
        self._placed.add(record)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        try:
            super()._do_return_conn(record)
        finally:
            if record in self._placed:
                self._placed.discard(record)
                assert self._places is not None
                self._places.release()
