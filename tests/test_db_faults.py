"""The database away, against real `chatbot-api serve` processes: a fast 503
`database_unavailable` with Retry-After (never a 500, never a hang) while PostgreSQL is
unreachable or SQLite is locked, zero errors once it is back, and a reply that cannot be
stored ends its stream with `reply_not_stored` instead of a success that was lost.

PostgreSQL is made unreachable without touching the shared cluster: the server talks to it
through `PostgresGate`, a loopback port that is closed (connections refused), a black hole
(connections accepted, never answered), restarting (every login refused with SQLSTATE 57P03,
as PostgreSQL does while it shuts down or starts up) or open (forwarded). The real restart,
under load, is in `tests/chaos/test_ledger.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.conversations.models import Conversation
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chaos import (
    Server,
    ServerPool,
    busy_until,
    create_conversation,
    free_port,
    sse_events,
    stored_messages,
    wait_ready,
)
from tests.chat.helpers import SSEEvent

logger = logging.getLogger(__name__)

# "Fast": bounded by the connect and busy timeouts, far from a 30 s hang.
FAST = 6.0
TERMINAL = {"message.completed", "message.incomplete", "message.failed"}


@pytest.fixture
async def servers(fake_llm: FakeLLM, tmp_path: Path) -> AsyncIterator[ServerPool]:
    pool = ServerPool(tmp_path, fake_llm.base_url)
    try:
        yield pool
    finally:
        await pool.aclose()


# PostgreSQL's wire protocol, as much as a gate that refuses logins needs of it.
SSL_REQUEST = 80877103
Mode = Literal["black_hole", "starting_up", "forward"]


def error_response(sqlstate: str, message: str) -> bytes:
    """A FATAL ErrorResponse message."""
    fields = b"".join(
        tag + value.encode() + b"\0"
        for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


class PostgresGate:
    """A loopback port in front of PostgreSQL that the test closes (connections refused),
    black-holes (accepted, never answered), sets starting up (every login refused with
    57P03, as a restarting server does) or opens (forwarded)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._mode: Mode = "forward"
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Refuse new connections and cut the open ones, as a stopped server does."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def listen(self, mode: Mode) -> None:
        await self.close()
        self._mode = mode
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            if self._mode == "black_hole":
                while await reader.read(65536):
                    pass  # swallow the startup packet: the client waits for an answer
            elif self._mode == "starting_up":
                await self._refuse_login(reader, writer)
            else:
                await self._forward(reader, writer)

    @staticmethod
    async def _refuse_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length, code = struct.unpack("!ii", await reader.readexactly(8))
        if code == SSL_REQUEST:
            writer.write(b"N")  # no TLS: the client sends its startup message next
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            await reader.readexactly(length - 4)
        else:
            await reader.readexactly(length - 8)
        writer.write(error_response("57P03", "the database system is starting up"))
        await writer.drain()
        writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def gate(postgres_url: str) -> AsyncIterator[PostgresGate]:
    url = make_url(postgres_url)
    gate = PostgresGate(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield gate
    finally:
        await gate.close()


async def timed(
    request: Coroutine[Any, Any, httpx.Response],
) -> tuple[httpx.Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await request
    return response, loop.time() - started


async def unavailable_answers(
    http: httpx.AsyncClient, conversation_id: str
) -> list[tuple[str, httpx.Response, float]]:
    """What the API answers while the database is away: creating a conversation, sending a
    message to it, to an unknown one, and readiness; all at once, each timed."""
    calls = {
        "create": http.post("/api/v1/conversations"),
        "send": http.post(
            f"/api/v1/conversations/{conversation_id}/messages", json={"message": "are you there"}
        ),
        "send-elsewhere": http.post(
            f"/api/v1/conversations/{uuid.uuid4()}/messages", json={"message": "hello"}
        ),
        "ready": http.get("/health/ready"),
    }
    answers = await asyncio.gather(*(timed(call) for call in calls.values()))
    return [(name, *answer) for name, answer in zip(calls, answers, strict=True)]


def assert_unavailable(answers: list[tuple[str, httpx.Response, float]]) -> None:
    logger.info("while away: %s", [(n, r.status_code, round(t, 2)) for n, r, t in answers])
    for name, response, elapsed in answers:
        assert response.status_code == 503, (name, response.status_code, response.text)
        assert elapsed < FAST, (name, elapsed)
        assert int(response.headers["Retry-After"]) >= 1, name
        expected = "not_ready" if name == "ready" else "database_unavailable"
        assert response.json()["error"]["code"] == expected, (name, response.text)


async def start_behind(gate: PostgresGate, servers: ServerPool, postgres_url: str) -> Server:
    """A server whose database is reached through the gate, open to begin with."""
    through_gate = make_url(postgres_url).set(host="127.0.0.1", port=gate.port)
    await gate.listen("forward")
    return await servers.start(
        through_gate.render_as_string(hide_password=False),
        env={"DB_CONNECT_TIMEOUT": "2", "DB_POOL_TIMEOUT": "2"},
    )


# `engine` (on the same database) empties the tables after each test.
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
class TestPostgresUnreachable:
    async def test_fast_503s_while_it_is_away_and_no_errors_once_it_is_back(
        self, engine: AsyncEngine, postgres_url: str, gate: PostgresGate, servers: ServerPool
    ) -> None:
        server = await start_behind(gate, servers, postgres_url)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
            first = await http.post(
                f"/api/v1/conversations/{conversation_id}/messages", json={"message": "one"}
            )
            await gate.close()  # refused, and the pooled connections are cut
            refused = await unavailable_answers(http, conversation_id)
            await gate.listen("black_hole")  # accepted, never answered: only the timeouts end it
            unanswered = await unavailable_answers(http, conversation_id)
            # Shutting down or starting up, PostgreSQL refuses logins with SQLSTATE 57P03
            # ("cannot connect now"): the window every restart goes through.
            await gate.listen("starting_up")
            restarting = await unavailable_answers(http, conversation_id)
            await gate.listen("forward")
            await wait_ready(server.base_url)
            after = [
                await http.post(
                    f"/api/v1/conversations/{conversation_id}/messages", json={"message": f"{i}"}
                )
                for i in range(3)
            ]
            after.append(await http.post("/api/v1/conversations"))
            stored = (
                await http.get(f"/api/v1/conversations/{conversation_id}/messages?limit=100")
            ).json()["data"]

        assert first.status_code == 200, first.text
        assert_unavailable(refused)
        assert_unavailable(unanswered)
        assert_unavailable(restarting)
        assert [r.status_code for r in after] == [200, 200, 200, 201], [r.text for r in after]
        # The sends refused while it was away left nothing behind: no message, no lost seq.
        assert [m["seq"] for m in stored] == list(range(1, 9))
        assert [m["content"] for m in stored if m["role"] == "user"] == ["one", "0", "1", "2"]
        assert {m["status"] for m in stored} == {"completed"}

    async def test_a_reply_finished_while_the_database_restarts_is_stored_once_it_is_back(
        self,
        engine: AsyncEngine,
        postgres_url: str,
        gate: PostgresGate,
        servers: ServerPool,
        fake_llm: FakeLLM,
    ) -> None:
        deltas = tuple(f"t{i} " for i in range(20))
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.05))
        server = await start_behind(gate, servers, postgres_url)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
            restart = PostgresRestart(gate)
            events = await stream_through(
                http, conversation_id, fake_llm, restart, end_after_finish=1.0
            )
            stored = (await http.get(f"/api/v1/conversations/{conversation_id}/messages")).json()

        assert events[-1].event == "message.completed", events[-1]
        reply = stored["data"][1]
        assert (reply["status"], reply["content"]) == ("completed", "".join(deltas))


def sqlite_path(db_url: str) -> str:
    database = make_url(db_url).database
    assert database
    return database


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock from another connection, as a long transaction would."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield connection
    finally:
        connection.rollback()
        connection.close()


async def count_conversations(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(Conversation)) or 0)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
class TestSqliteLocked:
    async def test_a_locked_database_is_a_503_and_nothing_is_half_stored(
        self, engine: AsyncEngine, servers: ServerPool, db_url: str
    ) -> None:
        server = await servers.start(db_url, env={"DB_CONNECT_TIMEOUT": "0.3"})
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
            conversations_before = await count_conversations(engine)
            with exclusive_lock(sqlite_path(db_url)):
                answers = [
                    await timed(http.post("/api/v1/conversations")),
                    *[
                        await timed(
                            http.post(
                                f"/api/v1/conversations/{conversation_id}/messages",
                                json={"message": f"locked out {i}"},
                            )
                        )
                        for i in range(3)
                    ],
                ]
            left_behind = await stored_messages(engine, conversation_id)
            claim = await busy_until(engine, conversation_id)
            conversations_after = await count_conversations(engine)
            released = await http.post(
                f"/api/v1/conversations/{conversation_id}/messages", json={"message": "now"}
            )
        stored = await stored_messages(engine, conversation_id)

        for response, elapsed in answers:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "database_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            assert elapsed < FAST
        assert left_behind == []
        assert claim is None
        assert conversations_after == conversations_before
        assert released.status_code == 200, released.text
        assert [(m["seq"], m["status"]) for m in stored] == [(1, "completed"), (2, "completed")]


class Fault(Protocol):
    async def begin(self) -> None: ...

    async def end(self) -> None: ...


class SqliteLock:
    def __init__(self, path: str) -> None:
        self._path = path
        self._held = contextlib.ExitStack()

    async def begin(self) -> None:
        self._held.enter_context(exclusive_lock(self._path))

    async def end(self) -> None:
        self._held.close()


class PostgresRestart:
    def __init__(self, gate: PostgresGate) -> None:
        self._gate = gate

    async def begin(self) -> None:
        await self._gate.listen("starting_up")

    async def end(self) -> None:
        await self._gate.listen("forward")


async def stream_through(
    http: httpx.AsyncClient,
    conversation_id: str,
    fake_llm: FakeLLM,
    fault: Fault,
    *,
    end_after_finish: float | None,
) -> list[SSEEvent]:
    """Stream a reply with `fault` begun at its first delta and ended `end_after_finish`
    seconds after the provider has finished, or (None) once the stream has ended: the final
    store of the reply meets the fault either way."""
    events: list[SSEEvent] = []
    active = False
    try:
        async with (
            asyncio.timeout(30),
            http.stream(
                "POST",
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"message": "tell me", "stream": True},
            ) as response,
        ):
            assert response.status_code == 200
            async for event in sse_events(response):
                events.append(event)
                if event.event == "message.delta" and len(events) == 2:
                    await fault.begin()
                    active = True
                    if end_after_finish is not None:
                        await fake_llm.requests[-1].finished.wait()
                        await asyncio.sleep(end_after_finish)
                        await fault.end()
                        active = False
                if event.event in TERMINAL and active:
                    await fault.end()
                    active = False
    finally:
        if active:
            await fault.end()
    return events


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
class TestReplyStorage:
    async def test_a_short_lock_is_waited_out_and_a_long_one_ends_in_reply_not_stored(
        self, engine: AsyncEngine, servers: ServerPool, fake_llm: FakeLLM, db_url: str
    ) -> None:
        deltas = tuple(f"t{i} " for i in range(20))
        fake_llm.default = Script(deltas=deltas, token_delay=0.05)
        server = await servers.start(db_url, env={"DB_CONNECT_TIMEOUT": "0.3"})
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            briefly, for_good = await create_conversation(http), await create_conversation(http)
            lock = SqliteLock(sqlite_path(db_url))
            # Released a second after the reply was generated: within the store's retries.
            stored_late = await stream_through(http, briefly, fake_llm, lock, end_after_finish=1.0)
            # Held until the stream has ended: longer than the store is retried (~6 s).
            never_stored = await stream_through(
                http, for_good, fake_llm, lock, end_after_finish=None
            )
        late_rows = await stored_messages(engine, briefly)
        lost_rows = await stored_messages(engine, for_good)

        assert stored_late[-1].event == "message.completed", stored_late[-1]
        assert stored_late[-1].data["response"] == "".join(deltas)
        assert (late_rows[1]["status"], late_rows[1]["content"]) == ("completed", "".join(deltas))
        assert never_stored[-1].event == "message.failed", never_stored[-1]
        assert never_stored[-1].data["error"]["code"] == "reply_not_stored"
        assert never_stored[-1].data["status"] == "failed"
        assert sum(e.event in TERMINAL for e in never_stored) == 1
        # The client was told the reply is lost, so the database must not claim it completed.
        assert lost_rows[1]["status"] != "completed"
