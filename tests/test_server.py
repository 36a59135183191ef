"""Against a real uvicorn process (`chatbot-api serve`), where the transport matters:
streams, client disconnects, and several server processes sharing one database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.auth.helpers import SERVER_ENV, bearer, key_in_database
from tests.chat.helpers import messages, parse_sse
from tests.conftest import FAKE_KEY

ServerFactory = Callable[..., Awaitable[str]]
FAST_CHECKPOINTS = {"STREAM_CHECKPOINT_INTERVAL": "0.1"}
# The API key each started server (by base URL) accepts.
KEYS: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def start_server(fake_llm: FakeLLM) -> AsyncIterator[ServerFactory]:
    """Start `chatbot-api serve` processes on a database URL; SIGTERM them after the test."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(db_url: str, extra: dict[str, str] | None = None) -> str:
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "LLM_PROVIDER": "openai",
            "LLM_BASE_URL": fake_llm.base_url,
            "LLM_API_KEY": FAKE_KEY,
            "LLM_MODEL": "fake-model",
            "LOG_LEVEL": "WARNING",
            **SERVER_ENV,
            **(extra or {}),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatbot_api.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            env=env,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(150):
                try:
                    if (await http.get("/health")).status_code == 200:
                        KEYS[base] = await key_in_database(db_url)
                        return base
                except httpx.TransportError:
                    pass
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.1)
        raise AssertionError("the server did not start")

    yield start
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_for_status(
    http: httpx.AsyncClient, conversation_id: str, status: str
) -> dict[str, object]:
    async with asyncio.timeout(15):
        while True:
            stored = await messages(http, conversation_id)
            if len(stored) == 2 and stored[1]["status"] == status:
                return stored[1]
            await asyncio.sleep(0.1)


class TestClientDisconnect:
    async def test_generation_finishes_and_is_stored_after_the_client_leaves(
        self, db_url: str, engine: AsyncEngine, start_server: ServerFactory, fake_llm: FakeLLM
    ) -> None:
        deltas = tuple(f"tok{i} " for i in range(30))
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.05))
        base = await start_server(db_url)
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=bearer(KEYS[base])) as http:
            conversation_id = (await http.post("/api/v1/conversations")).json()["id"]
            seen = 0
            async with http.stream(
                "POST",
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"message": "count to thirty", "stream": True},
            ) as response:
                async for line in response.aiter_lines():
                    if line == "event: message.delta":
                        seen += 1
                        if seen == 3:
                            break  # leave mid-stream: the connection is closed here

            reply = await _wait_for_status(http, conversation_id, "completed")

        assert reply["content"] == "".join(deltas)
        assert fake_llm.requests[0].cancelled is False


class TestSeveralProcesses:
    async def test_concurrent_sends_through_two_servers_never_lose_or_interleave(
        self, postgres_url: str, start_server: ServerFactory, fake_llm: FakeLLM
    ) -> None:
        fake_llm.default = Script(reply="ok", ttft=0.02)
        bases = [await start_server(postgres_url), await start_server(postgres_url)]
        # One caller, through both servers.
        auth = bearer(KEYS[bases[0]])
        clients = [httpx.AsyncClient(base_url=b, timeout=20, headers=auth) for b in bases]
        try:
            conversation_id = (await clients[0].post("/api/v1/conversations")).json()["id"]

            async def send(i: int) -> int:
                response = await clients[i % 2].post(
                    f"/api/v1/conversations/{conversation_id}/messages",
                    json={"message": f"message {i}"},
                )
                return response.status_code

            codes: list[int] = []
            for _ in range(5):
                codes += await asyncio.gather(*(send(i) for i in range(20)))
            stored = await messages(clients[1], conversation_id)
            await clients[0].delete(f"/api/v1/conversations/{conversation_id}")
        finally:
            for client in clients:
                await client.aclose()

        assert set(codes) <= {200, 409}, codes
        ok = codes.count(200)
        assert ok >= 5
        assert len(stored) == 2 * ok
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        assert [m["role"] for m in stored] == ["user", "assistant"] * ok
        assert all(m["status"] == "completed" for m in stored)


class TestAcrossProcesses:
    """A reply generated by server A, resumed and cancelled through server B: B follows the
    reply's checkpointed row, and A sees the cancel request at its next checkpoint."""

    async def test_resume_through_another_process_has_no_gap_or_duplicate(
        self, postgres_url: str, start_server: ServerFactory, fake_llm: FakeLLM
    ) -> None:
        deltas = tuple(f"word{i} " for i in range(40))
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.05))
        a = await start_server(postgres_url, FAST_CHECKPOINTS)
        b = await start_server(postgres_url, FAST_CHECKPOINTS)
        headers = bearer(KEYS[a])
        async with (
            httpx.AsyncClient(base_url=a, timeout=15, headers=headers) as on_a,
            httpx.AsyncClient(base_url=b, timeout=15, headers=headers) as on_b,
        ):
            conversation_id = (await on_a.post("/api/v1/conversations")).json()["id"]
            received, last_id, message_id = "", "0", ""
            async with on_a.stream(
                "POST",
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"message": "count", "stream": True},
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        message_id = data.get("assistant_message_id", message_id)
                        received += data.get("delta", "")
                    elif line.startswith("id: "):
                        last_id = line[4:]
                    if len(received) > 40 and line.startswith("id: "):
                        break  # the connection to A is lost here
            resumed = await on_b.get(
                f"/api/v1/conversations/{conversation_id}/messages/{message_id}/stream",
                headers={"Last-Event-ID": last_id},
            )
            events = parse_sse(resumed.text)
            stored = await _wait_for_status(on_b, conversation_id, "completed")
            await on_a.delete(f"/api/v1/conversations/{conversation_id}")

        after = "".join(e.data["delta"] for e in events if e.event == "message.delta")
        assert events[-1].event == "message.completed"
        assert received + after == stored["content"] == "".join(deltas)

    async def test_cancel_through_another_process(
        self, postgres_url: str, start_server: ServerFactory, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=tuple(f"w{i} " for i in range(200)), token_delay=0.05))
        a = await start_server(postgres_url, FAST_CHECKPOINTS)
        b = await start_server(postgres_url, FAST_CHECKPOINTS)
        headers = bearer(KEYS[a])
        async with (
            httpx.AsyncClient(base_url=a, timeout=15, headers=headers) as on_a,
            httpx.AsyncClient(base_url=b, timeout=15, headers=headers) as on_b,
        ):
            conversation_id = (await on_a.post("/api/v1/conversations")).json()["id"]
            sending = asyncio.create_task(
                on_a.post(
                    f"/api/v1/conversations/{conversation_id}/messages", json={"message": "go"}
                )
            )
            reply = await _wait_for_status(on_b, conversation_id, "streaming")
            await asyncio.sleep(0.5)

            cancelled = await on_b.post(
                f"/api/v1/conversations/{conversation_id}/messages/{reply['id']}/cancel"
            )
            answer = await sending
            await on_a.delete(f"/api/v1/conversations/{conversation_id}")

        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert 0 < len(cancelled.json()["content"]) < len("".join(f"w{i} " for i in range(200)))
        assert answer.json()["error"]["code"] == "cancelled"
        assert fake_llm.requests[0].cancelled is True
