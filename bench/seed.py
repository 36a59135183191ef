"""The bench database: created fresh, migrated by the app's own `chatbot-api migrate`, seeded
with COPY, analysed, and dropped at the end.

Seeded rows are cloned from rows the running app wrote itself (one conversation and one turn
through the API), then only the fields that matter are changed: id, sequence, role, content,
token count, timestamps. Columns added by other work (an owner, a tenant...) therefore get the
values the app gives them, and the seed keeps up with the schema without being edited.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.client import fetch
from bench.servers import LOGS, PYTHON, clean_environ

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
WORDS = (
    "the model answers questions about python services databases latency memory streams "
    "tokens context window history users replies caching indexes queries async workers "
    "deployment metrics logging errors retries budgets conversations messages sequence"
).split()


def dsn(name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def app_url(name: str) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def recreate_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _cli(name: str, *args: str) -> str:
    """`chatbot-api <args>` against database `name`, with the settings the bench's apps run
    with (`servers.AppConfig`); its output, or RuntimeError if it fails."""
    LOGS.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        PYTHON,
        *("-m", "chatbot_api.cli", *args),
        cwd=LOGS,
        env=clean_environ()
        | {"DATABASE_URL": app_url(name), "LOG_LEVEL": "WARNING", "ENVIRONMENT": "development"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    if process.returncode != 0:
        raise RuntimeError(f"chatbot-api {' '.join(args)} failed:\n{out.decode()}")
    return out.decode()


async def migrate(name: str) -> None:
    await _cli(name, "migrate")


async def create_key(name: str, *, user: str = "local") -> str:
    """A new API key for `user` (`chatbot-api keys create`), for the phases that measure the
    request path with authentication on. The seeded conversations belong to `local`."""
    out = await _cli(name, "keys", "create", "--name", "bench", "--user", user)
    return out.strip().splitlines()[-1]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


@dataclass
class Templates:
    """Rows the app wrote: a conversation, a user message, an assistant reply."""

    conversation: dict[str, Any]
    user: dict[str, Any]
    assistant: dict[str, Any]


async def capture_templates(conn: asyncpg.Connection, app_port: int) -> Templates:
    created = await fetch(app_port, "POST", "/api/v1/conversations", {})
    if created.status != 201:
        raise RuntimeError(f"create conversation: HTTP {created.status} {created.body[:200]!r}")
    cid = created.json()["id"]
    path = f"/api/v1/conversations/{cid}/messages"
    sent = await fetch(app_port, "POST", path, {"message": "Hello, template turn."})
    if sent.status != 200:
        raise RuntimeError(f"send message: HTTP {sent.status} {sent.body[:200]!r}")
    conversation = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1", uuid.UUID(cid))
    rows = await conn.fetch(
        "SELECT * FROM messages WHERE conversation_id = $1 ORDER BY seq", uuid.UUID(cid)
    )
    user = next(r for r in rows if r["role"] == "user")
    assistant = next(r for r in rows if r["role"] == "assistant")
    return Templates(dict(conversation), dict(user), dict(assistant))


class Seeder:
    """Builds conversations of `n` messages each, alternating user and assistant turns."""

    def __init__(self, templates: Templates, count_tokens: Any, seed: int = 1) -> None:
        self.t = templates
        self.count = count_tokens
        self.rng = random.Random(seed)
        self.conv_cols = list(templates.conversation)
        self.msg_cols = list(templates.user)
        self._start = datetime.now(UTC) - timedelta(days=30)

    def conversation(self, n: int, i: int) -> tuple[uuid.UUID, tuple[Any, ...]]:
        cid = uuid.uuid4()
        at = self._start + timedelta(seconds=i)
        row = self.t.conversation | {
            "id": cid,
            "title": None,
            "system_prompt": None,
            "next_seq": n + 1,
            "busy_until": None,
            "created_at": at,
            "updated_at": at,
        }
        return cid, tuple(row[c] for c in self.conv_cols)

    def messages(
        self, cid: uuid.UUID, n: int, *, words: tuple[int, int], tokens: int | None = None
    ) -> list[tuple[Any, ...]]:
        out = []
        for seq in range(1, n + 1):
            template = self.t.user if seq % 2 else self.t.assistant
            content = sentence(self.rng, self.rng.randint(*words))
            at = self._start + timedelta(seconds=seq)
            row = template | {
                "id": uuid.uuid4(),
                "conversation_id": cid,
                "seq": seq,
                "content": content,
                "status": "completed",
                "token_count": tokens if tokens is not None else self.count(content),
                "created_at": at,
                "completed_at": at,
            }
            out.append(tuple(row[c] for c in self.msg_cols))
        return out

    async def insert(
        self,
        conn: asyncpg.Connection,
        count: int,
        per_conversation: int,
        *,
        words: tuple[int, int] = (8, 30),
        tokens: int | None = None,
    ) -> list[str]:
        """Insert `count` conversations of `per_conversation` messages; their ids."""
        ids: list[str] = []
        batch = max(1, 20_000 // max(1, per_conversation))
        for start in range(0, count, batch):
            convs, msgs = [], []
            for i in range(start, min(count, start + batch)):
                cid, row = self.conversation(per_conversation, i)
                convs.append(row)
                msgs.extend(self.messages(cid, per_conversation, words=words, tokens=tokens))
                ids.append(str(cid))
            await conn.copy_records_to_table("conversations", records=convs, columns=self.conv_cols)
            await conn.copy_records_to_table("messages", records=msgs, columns=self.msg_cols)
        return ids


async def analyze(conn: asyncpg.Connection) -> None:
    await conn.execute("ANALYZE conversations")
    await conn.execute("ANALYZE messages")


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        "conversations": await conn.fetchval("SELECT count(*) FROM conversations"),
        "messages": await conn.fetchval("SELECT count(*) FROM messages"),
    }


async def idle_in_transaction(
    conn: asyncpg.Connection, name: str, older_than: float
) -> Sequence[Any]:
    """(all idle-in-transaction sessions of the bench DB, those idle longer than `older_than`
    seconds, the longest idle time in seconds)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE state = 'idle in transaction') AS iit,
               count(*) FILTER (WHERE state = 'idle in transaction'
                                AND now() - state_change > make_interval(secs => $2)) AS held,
               coalesce(extract(epoch FROM max(now() - state_change)
                        FILTER (WHERE state = 'idle in transaction')), 0) AS longest
        FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()
        """,
        name,
        older_than,
    )
    return (row["iit"], row["held"], float(row["longest"]))
