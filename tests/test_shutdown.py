"""Stopping a server: SIGTERM drains open streams within the grace period, a turn cut short by
the end of the grace is stored `incomplete`, and after `kill -9` the next start's reaper marks
the orphaned reply `incomplete` with its last checkpoint. Real `chatbot-api serve` processes
and the fake LLM; the rows are read straight from the database.

Readiness after SIGTERM cannot be observed over HTTP: uvicorn closes idle keep-alive
connections and stops accepting new ones at once. The handler that flips it is tested in
process instead, with a real signal and a Python-level handler standing in for uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chaos import (
    Server,
    ServerPool,
    busy_until,
    create_conversation,
    sse_events,
    stored_messages,
)
from tests.chat.helpers import SSEEvent
from tests.conftest import AppFactory, client_for

# Either exit is a clean stop: uvicorn (>= 0.29) re-raises the SIGTERM it handled once the
# shutdown is complete, so a process manager sees "terminated by SIGTERM".
CLEAN_EXITS = (0, -signal.SIGTERM)
SHUTDOWN_COMPLETE = "Application shutdown complete"
TERMINAL = {"message.completed", "message.incomplete", "message.failed"}


def counted_deltas(count: int) -> tuple[str, ...]:
    return tuple(f"w{i} " for i in range(count))


@pytest.fixture
async def servers(fake_llm: FakeLLM, tmp_path: Path) -> AsyncIterator[ServerPool]:
    pool = ServerPool(tmp_path, fake_llm.base_url)
    try:
        yield pool
    finally:
        await pool.aclose()


async def stream_into(
    http: httpx.AsyncClient, conversation_id: str, message: str, received: list[SSEEvent]
) -> None:
    """Send `message` as a stream and append its events to `received` until it ends or the
    server closes the connection."""
    with contextlib.suppress(httpx.TransportError):
        async with http.stream(
            "POST",
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"message": message, "stream": True},
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for event in sse_events(response):
                received.append(event)


async def wait_for_deltas(received: list[SSEEvent], count: int, task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(15):
        while sum(e.event == "message.delta" for e in received) < count:
            assert not task.done(), received
            await asyncio.sleep(0.02)


def text_of(received: list[SSEEvent]) -> str:
    return "".join(e.data["delta"] for e in received if e.event == "message.delta")


async def refuses_connections(server: Server) -> bool:
    """Whether the server stops accepting connections while its process still runs."""
    async with asyncio.timeout(10):
        while server.process.returncode is None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as probe:
                try:
                    await probe.get("/health")
                except (httpx.ConnectError, httpx.RemoteProtocolError):
                    # Refused, or accepted in the instant the listener closed and then
                    # dropped unanswered: either way no longer serving new connections.
                    return server.process.returncode is None
            await asyncio.sleep(0.02)
    return False


class TestSigterm:
    @pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
    async def test_an_open_stream_is_finished_and_stored_before_the_process_exits(
        self, engine: AsyncEngine, servers: ServerPool, fake_llm: FakeLLM, db_url: str
    ) -> None:
        deltas = counted_deltas(30)
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.07))  # about 2 s
        server = await servers.start(
            db_url, env={"SHUTDOWN_GRACE_SECONDS": "10"}, args=["--graceful-timeout", "10"]
        )
        received: list[SSEEvent] = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
            reader = asyncio.create_task(stream_into(http, conversation_id, "count", received))
            await wait_for_deltas(received, 3, reader)
            server.signal(signal.SIGTERM)
            refused = await refuses_connections(server)
            async with asyncio.timeout(20):
                await reader
        exit_code = await server.wait(20)
        stored = await stored_messages(engine, conversation_id)

        assert refused, "new connections were still accepted while the stream was drained"
        assert received[-1].event == "message.completed", received[-1]
        assert text_of(received) == "".join(deltas)
        assert received[-1].data["response"] == "".join(deltas)
        assert exit_code in CLEAN_EXITS, server.log_tail()
        assert SHUTDOWN_COMPLETE in server.log_tail(), server.log_tail()
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "completed"),
            ("assistant", "completed"),
        ]
        assert stored[1]["content"] == "".join(deltas)

    @pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
    async def test_replies_longer_than_the_grace_are_stored_incomplete_with_their_text(
        self, engine: AsyncEngine, servers: ServerPool, fake_llm: FakeLLM, db_url: str
    ) -> None:
        deltas = counted_deltas(200)
        fake_llm.default = Script(deltas=deltas, token_delay=0.05)  # about 10 s each
        server = await servers.start(
            db_url, env={"SHUTDOWN_GRACE_SECONDS": "0.5"}, args=["--graceful-timeout", "1"]
        )
        connected: list[SSEEvent] = []
        left: list[SSEEvent] = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            kept, gone = await create_conversation(http), await create_conversation(http)
            reader = asyncio.create_task(stream_into(http, kept, "stay", connected))
            leaver = asyncio.create_task(stream_into(http, gone, "leave", left))
            await wait_for_deltas(left, 3, leaver)
            leaver.cancel()  # the client goes away mid-stream
            await asyncio.gather(leaver, return_exceptions=True)
            await wait_for_deltas(connected, 5, reader)
            server.signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await reader
        exit_code = await server.wait(20)
        rows = {cid: await stored_messages(engine, cid) for cid in (kept, gone)}
        claims = [await busy_until(engine, cid) for cid in (kept, gone)]

        assert exit_code in CLEAN_EXITS, server.log_tail()
        assert not any(e.event in TERMINAL for e in connected), connected[-1]
        full = "".join(deltas)
        for cid, client_text in ((kept, text_of(connected)), (gone, text_of(left))):
            user, reply = rows[cid]
            assert (user["status"], reply["status"]) == ("completed", "incomplete"), reply
            # The partial text is kept: everything the client saw, and no more than was made.
            assert reply["content"].startswith(client_text)
            assert full.startswith(reply["content"])
            assert len(client_text) > 0
            assert len(reply["content"]) < len(full)
        assert claims == [None, None], "a cut turn must release its conversation"

    @pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
    async def test_after_kill_9_the_reaper_keeps_the_checkpoint_and_frees_the_conversation(
        self, engine: AsyncEngine, servers: ServerPool, fake_llm: FakeLLM, db_url: str
    ) -> None:
        deltas = counted_deltas(200)
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.05))  # about 10 s
        fake_llm.default = Script(reply="Back again.")
        reliability = {"STREAM_CHECKPOINT_INTERVAL": "0.2", "CONVERSATION_LEASE_SECONDS": "1"}
        first = await servers.start(db_url, env=reliability)
        received: list[SSEEvent] = []
        async with httpx.AsyncClient(base_url=first.base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
            reader = asyncio.create_task(stream_into(http, conversation_id, "go", received))
            await wait_for_deltas(received, 10, reader)
            # Wait for a checkpoint: the partial text is in the database.
            async with asyncio.timeout(10):
                while True:
                    if (await stored_messages(engine, conversation_id))[1]["content"]:
                        break
                    await asyncio.sleep(0.05)
            first.signal(signal.SIGKILL)
            killed = await first.wait(10)
            async with asyncio.timeout(10):
                await reader
        orphan = (await stored_messages(engine, conversation_id))[1]
        lapses = await busy_until(engine, conversation_id)
        assert lapses is not None
        # The next start reaps only once the dead process's claim has lapsed.
        await asyncio.sleep(max(0.0, (lapses - datetime.now(UTC)).total_seconds()) + 0.2)

        second = await servers.start(db_url, env=reliability)
        async with httpx.AsyncClient(base_url=second.base_url, timeout=30) as http:
            async with asyncio.timeout(15):
                while True:
                    reaped = (await stored_messages(engine, conversation_id))[1]
                    if reaped["status"] != "streaming":
                        break
                    await asyncio.sleep(0.1)
            again = await http.post(
                f"/api/v1/conversations/{conversation_id}/messages", json={"message": "hello?"}
            )
        stored = await stored_messages(engine, conversation_id)

        assert killed == -signal.SIGKILL
        assert orphan["status"] == "streaming"  # the kill left an orphan for the reaper
        checkpoint = orphan["content"]
        assert checkpoint
        assert "".join(deltas).startswith(checkpoint)
        assert len(checkpoint) < len("".join(deltas))
        assert reaped["status"] == "incomplete"
        assert reaped["content"] == checkpoint
        assert reaped["error"]["code"] == "generation_interrupted"
        assert again.status_code == 200, again.text
        assert again.json()["response"] == "Back again."
        assert [m["seq"] for m in stored] == [1, 2, 3, 4]
        assert [m["status"] for m in stored] == [
            "completed",
            "incomplete",
            "completed",
            "completed",
        ]


class TestReadinessOnSigterm:
    async def test_sigterm_reports_not_ready_and_reaches_the_previous_handler(
        self, app_factory: AppFactory
    ) -> None:
        handled: list[int] = []

        def previous(signum: int, _frame: FrameType | None) -> None:
            handled.append(signum)  # stands in for uvicorn's handler: nothing exits

        original = signal.signal(signal.SIGTERM, previous)
        try:
            app = await app_factory()  # its lifespan chains onto `previous`
            async with client_for(app) as http:
                before = await http.get("/health/ready")
                signal.raise_signal(signal.SIGTERM)
                after = await http.get("/health/ready")
        finally:
            signal.signal(signal.SIGTERM, original)

        assert before.status_code == 200, before.text
        assert handled == [signal.SIGTERM]
        assert after.status_code == 503
        assert after.json()["error"]["details"][0]["server"] == "shutting_down"
        assert after.headers["Retry-After"] == "1"
