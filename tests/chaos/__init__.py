"""Real `chatbot-api serve` processes, their database, and the faults done to them.

Shared by the shutdown, database-fault and chaos tests:

- `ServerPool` starts servers (each logging to a file; `Server.log_tail()` goes into failure
  messages) and stops them after the test: SIGTERM, then SIGKILL if they do not exit.
- `sse_events` reads a live event stream one event at a time.
- `postgres_ctl` stops, starts and restarts the PostgreSQL cluster the tests run on. By
  default that is the local Debian cluster (`pg_ctlcluster <version> main`, as root); set
  `TEST_POSTGRES_CTL` to another command prefix (the action is appended), e.g.
  `runuser -u postgres -- pg_ctl -D /path/to/data -w -m fast`. A restart cuts every client
  of that cluster for about a second, not only these tests.

Tests marked `chaos` are the long variants, run by `make chaos` and left out of `make test`.
They run for minutes and stop PostgreSQL for several seconds, so pyproject's addopts
deselects them unless `-m chaos` selects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatbot_api.conversations.models import Conversation, Message
from tests.chat.helpers import SSEEvent, parse_sse
from tests.conftest import FAKE_KEY, PG_SERVER

# How long a server may take to answer /health: imports, migrations, and a loaded machine.
START_TIMEOUT = 60.0
# How long a SIGTERMed server may take before it is killed after a test.
STOP_TIMEOUT = 30.0
# The main suite is not about limits: one (local, keyless) user does all the sending.
BASE_ENV = {
    "AUTH_MODE": "disabled",
    "LLM_PROVIDER": "openai",
    "LLM_API_KEY": FAKE_KEY,
    "LLM_MODEL": "fake-model",
    "LLM_MAX_RETRIES": "0",
    "LOG_LEVEL": "INFO",
    "RATE_LIMIT_REQUESTS_PER_MINUTE": "10000000",
    "RATE_LIMIT_CONCURRENT_STREAMS": "100000",
    "RATE_LIMIT_TOKENS_PER_DAY": "1000000000",
    # Teardown stops servers; a test about shutdown sets its own grace.
    "SHUTDOWN_GRACE_SECONDS": "2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(eq=False)
class Server:
    process: asyncio.subprocess.Process
    base_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            content = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(content.splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, seconds: float) -> int | None:
        """The exit status, or None if the process is still running after `seconds`."""
        try:
            return await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            return None

    async def stop(self, seconds: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL if the process has not exited within `seconds`."""
        self.signal(signal.SIGTERM)
        code = await self.wait(seconds)
        if code is None:
            self.signal(signal.SIGKILL)
            code = await self.process.wait()
        return code


def _open_log(path: Path) -> Any:
    return path.open("wb")


class ServerPool:
    """Starts `chatbot-api serve` processes talking to the fake LLM at `llm_base_url`."""

    def __init__(self, log_dir: Path, llm_base_url: str) -> None:
        self._log_dir = log_dir
        self._llm_base_url = llm_base_url
        self.servers: list[Server] = []

    async def start(
        self,
        db_url: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        migrate: bool = False,
    ) -> Server:
        """A server on `db_url` (already migrated unless `migrate`), once /health answers."""
        for _ in range(3):  # a port taken between our probe and the server's bind: retry
            server = await self._spawn(db_url, env or {}, args, migrate)
            if await self._wait_healthy(server):
                return server
            if "address already in use" not in server.log_tail().lower():
                break
        raise AssertionError(f"the server did not start:\n{server.log_tail()}")

    async def _spawn(
        self, db_url: str, env: Mapping[str, str], args: Sequence[str], migrate: bool
    ) -> Server:
        port = free_port()
        log = self._log_dir / f"server-{port}-{uuid.uuid4().hex[:6]}.log"
        handle = _open_log(log)
        try:
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
                *([] if migrate else ["--no-migrate"]),
                *args,
                env={
                    **os.environ,
                    **BASE_ENV,
                    "DATABASE_URL": db_url,
                    "LLM_BASE_URL": self._llm_base_url,
                    **env,
                },
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            handle.close()
        server = Server(process, f"http://127.0.0.1:{port}", log)
        self.servers.append(server)
        return server

    async def _wait_healthy(self, server: Server) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as http:
            while loop.time() < deadline and server.process.returncode is None:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        if server.process.returncode is None:
            await server.stop(5)
        return False

    async def aclose(self) -> None:
        for server in self.servers:
            server.signal(signal.SIGTERM)
        for server in self.servers:
            await server.stop()


async def wait_ready(base_url: str, within: float = 30.0) -> None:
    """Wait until /health/ready answers 200 (the database is back)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "no answer"
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        while loop.time() < deadline:
            try:
                response = await http.get("/health/ready")
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code == 200:
                    return
                last = response.text
            await asyncio.sleep(0.2)
    raise AssertionError(f"{base_url} was not ready after {within} s: {last}")


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The events of a live `text/event-stream` response, as each one arrives."""
    block: list[str] = []
    async for line in response.aiter_lines():
        if line:
            block.append(line)
            continue
        for event in parse_sse("\n".join(block)):
            yield event
        block = []
    for event in parse_sse("\n".join(block)):
        yield event


async def create_conversation(http: httpx.AsyncClient) -> str:
    response = await http.post("/api/v1/conversations")
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    return conversation_id


async def stored_messages(
    engine: AsyncEngine, conversation_id: str | uuid.UUID
) -> list[dict[str, Any]]:
    """The conversation's rows, read straight from the database, in `seq` order."""
    columns = (Message.id, Message.seq, Message.role, Message.status, Message.content)
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(*columns, Message.error)
            .where(Message.conversation_id == uuid.UUID(str(conversation_id)))
            .order_by(Message.seq)
        )
        return [row._asdict() for row in rows]


async def busy_until(engine: AsyncEngine, conversation_id: str | uuid.UUID) -> datetime | None:
    """When the conversation's claim lapses; None when no turn holds it."""
    async with engine.connect() as connection:
        value: datetime | None = await connection.scalar(
            select(Conversation.busy_until).where(
                Conversation.id == uuid.UUID(str(conversation_id))
            )
        )
    return value


# --- the PostgreSQL cluster -------------------------------------------------------------


def postgres_ctl(action: str, mode: str | None = None) -> list[str]:
    """The command that does `action` (start, stop, restart, status) to the test cluster.
    `mode` is the shutdown mode of a stop or restart (pg_ctl's `-m`): "fast" by default, a
    clean shutdown that writes out every commit; "immediate" is a crash (what the WAL had
    not written yet is lost, and the next start runs crash recovery)."""
    custom = os.environ.get("TEST_POSTGRES_CTL")
    if custom:
        return [*shlex.split(custom), action, *(("-m", mode) if mode else ())]
    etc = Path("/etc/postgresql")
    versions = sorted(p.name for p in etc.iterdir()) if etc.is_dir() else []
    if not versions:
        pytest.fail("no local PostgreSQL cluster to control: set TEST_POSTGRES_CTL")
    options = ("-m", mode) if mode else ()
    return ["pg_ctlcluster", "--skip-systemctl-redirect", *options, versions[-1], "main", action]


async def run_postgres_ctl(action: str, within: float = 60.0, mode: str | None = None) -> int:
    process = await asyncio.create_subprocess_exec(
        *postgres_ctl(action, mode),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        command = shlex.join(postgres_ctl(action, mode))
        raise AssertionError(f"`{command}` took over {within} s") from None


async def postgres_accepts(connect_within: float = 1.0) -> bool:
    try:
        connection = await asyncpg.connect(PG_SERVER, timeout=connect_within)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


async def wait_postgres(within: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await postgres_accepts():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"PostgreSQL did not accept connections within {within} s")


async def ensure_postgres_running() -> None:
    """Start the cluster if a test left it stopped, and wait until it accepts connections."""
    if not await postgres_accepts(connect_within=3.0) and await run_postgres_ctl("status") != 0:
        await run_postgres_ctl("start")
    await wait_postgres()


# --- the ledger: what the clients were told, checked against what was stored ------------


@dataclass(frozen=True, slots=True)
class Ack:
    """A send the server acknowledged (200, or a stream's `message.completed`)."""

    conversation_id: str
    message: str
    user_message_id: str
    assistant_message_id: str
    response: str


@dataclass(slots=True)
class Audit:
    """The stored side of the ledger."""

    lost: list[str]
    duplicated: list[str]
    seq_problems: list[str]
    stored_pairs: int
    streaming_rows: int


async def audit(engine: AsyncEngine, conversation_ids: Sequence[str], acks: Sequence[Ack]) -> Audit:
    """Check every acknowledged send against the database: its user message and its reply are
    stored once, in consecutive `seq`s, the reply `completed` with the acknowledged text; and
    every conversation's `seq`s are unique and gapless."""
    rows: dict[str, list[dict[str, Any]]] = {
        cid: await stored_messages(engine, cid) for cid in conversation_ids
    }
    by_id = {str(row["id"]): row for stored in rows.values() for row in stored}
    lost: list[str] = []
    for ack in acks:
        user = by_id.get(ack.user_message_id)
        reply = by_id.get(ack.assistant_message_id)
        if (
            user is None
            or reply is None
            or (user["role"], user["content"], user["status"]) != ("user", ack.message, "completed")
            or (reply["role"], reply["status"]) != ("assistant", "completed")
            or reply["content"] != ack.response
            or reply["seq"] != user["seq"] + 1
        ):
            lost.append(f"{ack.message}: user={user} reply={reply}")
    duplicated: list[str] = []
    seq_problems: list[str] = []
    for cid, stored in rows.items():
        seqs = [row["seq"] for row in stored]
        if seqs != list(range(1, len(seqs) + 1)):
            seq_problems.append(f"{cid}: {seqs}")
        sent = [row["content"] for row in stored if row["role"] == "user"]
        duplicated += sorted({text for text in sent if sent.count(text) > 1})
    return Audit(
        lost=lost,
        duplicated=duplicated,
        seq_problems=seq_problems,
        stored_pairs=sum(1 for stored in rows.values() for row in stored if row["role"] == "user"),
        streaming_rows=sum(
            1 for stored in rows.values() for row in stored if row["status"] == "streaming"
        ),
    )


@contextlib.asynccontextmanager
async def postgres_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database that survives restarts (pre-ping); it makes sure the
    cluster runs again, then empties the chat tables, when the test ends."""
    engine = create_async_engine(url, pool_pre_ping=True)
    try:
        yield engine
    finally:
        await ensure_postgres_running()
        async with engine.begin() as connection:
            await connection.execute(delete(Message))
            await connection.execute(delete(Conversation))
        await engine.dispose()
