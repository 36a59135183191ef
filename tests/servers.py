"""Real `chatbot-api serve` processes for the tests where the transport matters."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from chatbot_api.testing.fake_llm import FakeLLM
from tests.auth.helpers import SERVER_ENV, key_in_database
from tests.conftest import FAKE_KEY

ServerFactory = Callable[..., Awaitable[str]]
# The API key each started server (by base URL) accepts.
KEYS: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def start_server(fake_llm: FakeLLM) -> AsyncIterator[ServerFactory]:
    """Start `chatbot-api serve` processes on a database URL; SIGTERM them after the test."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(
        db_url: str, extra: dict[str, str] | None = None, *, migrate: bool = True
    ) -> str:
        port = free_port()
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
            "--migrate" if migrate else "--no-migrate",
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
