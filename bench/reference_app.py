"""The efficiency reference: a raw ASGI app on uvicorn with asyncpg and aiohttp, doing for a turn
the same statements the app does (see `chatbot_api.chat.service`), with no framework and no ORM.

    one statement   WITH claimed AS (UPDATE conversations ... RETURNING next_seq, ...),
                        inserted AS (INSERT INTO messages ... SELECT ... FROM claimed)
                    SELECT ... FROM claimed LEFT JOIN LATERAL (SELECT ... FROM messages
                        ...) (the claim, the user message and the reply placeholder, and
                        the first page of history, newest first), with no BEGIN or
                        COMMIT: the claim only takes a conversation whose system prompt
                        is known to fit (the default one, or one under a size bound)
                    SELECT ... FROM messages ...  (more history, in batches, until the
                        context budget is spent: rarely)
    no connection   POST {llm}/chat/completions, streamed, parsed chunk by chunk
    one statement   WITH finished AS (UPDATE messages SET content, status, usage ...
                        WHERE id = reply) UPDATE conversations SET busy_until = NULL ...
                        WHERE next_seq = claim

Routes: POST /api/v1/conversations, POST /api/v1/conversations/{id}/messages (JSON, or SSE
with `"stream": true`), GET /health. Tokens are counted with the app's own estimator, so
what differs from the app is only the framework, the ORM and the validation layers.

    python -m bench.reference_app --port 8100 --database-url postgresql://... --llm-url ...
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import uvicorn

from chatbot_api.llm.tokens import TokenEstimator

SYSTEM = "You are a helpful, concise assistant. Always answer in the language the user writes in."
CONTEXT_WINDOW, REPLY_TOKENS, PER_MESSAGE, OVERHEAD = 128_000, 1024, 4, 8
LEASE = timedelta(seconds=600)

# The claim, both messages and the first page of history in one statement, as the app runs it.
CLAIM = """WITH claimed AS (UPDATE conversations SET next_seq = next_seq + 2, busy_until = $2,
updated_at = $3 WHERE id = $1 AND (busy_until IS NULL OR busy_until < $3)
AND (nullif(system_prompt, '') IS NULL AND $10::boolean
OR octet_length(nullif(system_prompt, '')) <= $11::int)
RETURNING next_seq, system_prompt),
inserted AS (INSERT INTO messages (id, conversation_id, seq, role, content, status,
token_count, model_used, created_at, completed_at)
SELECT $5::uuid, $1, next_seq - 2, 'user', $6::text, 'completed', $7::int, NULL, $3, $3
FROM claimed UNION ALL
SELECT $8::uuid, $1, next_seq - 1, 'assistant', '', 'streaming', 0, $9::text, $3, NULL
FROM claimed)
SELECT claimed.next_seq, claimed.system_prompt, recent.seq, recent.role, recent.content,
recent.token_count FROM claimed LEFT JOIN LATERAL (SELECT seq, role, content, token_count
FROM messages WHERE conversation_id = $1 AND seq < claimed.next_seq - 2
AND status IN ('completed', 'incomplete', 'cancelled') ORDER BY seq DESC LIMIT $4) AS recent
ON true ORDER BY recent.seq DESC NULLS LAST"""
HISTORY = """SELECT seq, role, content, token_count FROM messages
WHERE conversation_id = $1 AND seq < $2 AND status IN ('completed', 'incomplete', 'cancelled')
ORDER BY seq DESC LIMIT $3"""
# The reply stored and the claim released in one statement (no BEGIN, no COMMIT), as the app.
FINISH = """WITH finished AS (UPDATE messages SET content = $2, status = $3, token_count = $4,
usage = $5::jsonb, finish_reason = $6, error = NULL, model_used = $7, completed_at = $8
WHERE id = $1)
UPDATE conversations SET busy_until = NULL, updated_at = $8 WHERE id = $9 AND next_seq = $10"""
CREATE = """INSERT INTO conversations (id, next_seq, created_at, updated_at)
VALUES ($1, 1, $2, $2)"""
# With an owner column (API keys), new conversations belong to the owner the app used.
CREATE_OWNED = """INSERT INTO conversations (id, next_seq, created_at, updated_at, owner_id)
VALUES ($1, 1, $2, $2, $3)"""


class Reference:
    def __init__(self, database_url: str, llm_url: str, pool_size: int) -> None:
        self.database_url = database_url
        self.llm_url = llm_url.rstrip("/") + "/chat/completions"
        self.pool_size = pool_size
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.tokens = TokenEstimator()
        self.owner: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await _json(send, 200, {"status": "ok"})
        elif path == "/api/v1/conversations" and method == "POST":
            await _json(send, 201, await self.create())
        elif path.startswith("/api/v1/conversations/") and path.endswith("/messages"):
            body = json.loads(await _body(receive))
            cid = uuid.UUID(path.split("/")[4])
            await self.turn(send, cid, body["message"], bool(body.get("stream")))
        else:
            await _json(send, 404, {"error": {"code": "not_found"}})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                size = self.pool_size
                self.pool = await asyncpg.create_pool(self.database_url, min_size=2, max_size=size)
                async with self.pool.acquire() as conn:
                    has_owner = await conn.fetchval(
                        "SELECT count(*) FROM information_schema.columns "
                        "WHERE table_name = 'conversations' AND column_name = 'owner_id'"
                    )
                    if has_owner:
                        self.owner = await conn.fetchval(
                            "SELECT owner_id FROM conversations LIMIT 1"
                        )
                self.http = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, limit_per_host=0)
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.http is not None:
                    await self.http.close()
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def create(self) -> dict[str, Any]:
        assert self.pool is not None
        cid, now = uuid.uuid4(), datetime.now(UTC)
        async with self.pool.acquire() as conn:
            if self.owner is not None:
                await conn.execute(CREATE_OWNED, cid, now, self.owner)
            else:
                await conn.execute(CREATE, cid, now)
        return {"id": str(cid), "created_at": now.isoformat()}

    async def begin(self, cid: uuid.UUID, text: str) -> tuple[Any, ...] | None:
        assert self.pool is not None
        now = datetime.now(UTC)
        text_tokens = self.tokens.count(text)
        # The room left for the system prompt, and the byte bound that surely fits it.
        prompt_room = CONTEXT_WINDOW - REPLY_TOKENS - OVERHEAD - PER_MESSAGE - text_tokens
        default_fits = self.tokens.count(SYSTEM) + PER_MESSAGE <= prompt_room
        prompt_bytes = int((prompt_room - PER_MESSAGE - 1) / self.tokens.max_tokens_per_byte())
        async with self.pool.acquire() as conn:
            batch = 64
            user_id, reply_id = uuid.uuid4(), uuid.uuid4()
            claimed = await conn.fetch(
                CLAIM,
                cid,
                now + LEASE,
                now,
                batch,
                user_id,
                text,
                text_tokens,
                reply_id,
                "fake",
                default_fits,
                prompt_bytes,
            )
            if not claimed:
                return None
            claim_seq, system = claimed[0]["next_seq"], claimed[0]["system_prompt"] or SYSTEM
            room = CONTEXT_WINDOW - REPLY_TOKENS - OVERHEAD - PER_MESSAGE * 2
            room -= self.tokens.count(system) + text_tokens
            history: list[dict[str, str]] = []
            cursor, used, full = claim_seq - 2, 0, False
            rows: list[Any] | None = [row for row in claimed if row["seq"] is not None]
            while not full:
                if rows is None:
                    rows = await conn.fetch(HISTORY, cid, cursor, batch)
                for row in rows:
                    cost = row["token_count"] + PER_MESSAGE
                    if used + cost > room:
                        full = True
                        break
                    cursor, used = row["seq"], used + cost
                    if row["content"]:
                        history.append({"role": row["role"], "content": row["content"]})
                if len(rows) < batch:
                    break
                rows, batch = None, min(1024, batch * 4)
            history.reverse()
        system_message = {"role": "system", "content": system}
        messages = [system_message, *history, {"role": "user", "content": text}]
        return claim_seq, user_id, reply_id, messages

    async def turn(self, send: Any, cid: uuid.UUID, text: str, stream: bool) -> None:
        begun = await self.begin(cid, text)
        if begun is None:
            await _json(send, 409, {"error": {"code": "conversation_busy"}})
            return
        claim_seq, user_id, reply_id, messages = begun
        ids = {
            "conversation_id": str(cid),
            "user_message_id": str(user_id),
            "assistant_message_id": str(reply_id),
        }
        index = 0
        if stream:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send(_event(index, "message.created", ids | {"model_used": "fake"}))
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        finish: str | None = None
        assert self.http is not None
        payload = {
            "model": "fake",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": REPLY_TOKENS,
        }
        async with self.http.post(self.llm_url, data=json.dumps(payload).encode()) as response:
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if not frame.startswith(b"data: ") or frame == b"data: [DONE]":
                        continue
                    data = json.loads(frame[6:])
                    usage = data.get("usage") or usage
                    for choice in data.get("choices", ()):
                        finish = choice.get("finish_reason") or finish
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            parts.append(delta)
                            if stream:
                                index += 1
                                await send(_event(index, "message.delta", {"delta": delta}))
        reply = "".join(parts)
        await self.finish(cid, reply_id, claim_seq, reply, usage, finish)
        result = ids | {
            "response": reply,
            "model_used": "fake",
            "status": "completed",
            "finish_reason": finish,
            "usage": usage,
        }
        if stream:
            last = _event(index + 1, "message.completed", result)
            await send(last | {"more_body": False})
        else:
            await _json(send, 200, result)

    async def finish(
        self,
        cid: uuid.UUID,
        reply_id: uuid.UUID,
        claim_seq: int,
        reply: str,
        usage: dict[str, Any] | None,
        finish: str | None,
    ) -> None:
        assert self.pool is not None
        now = datetime.now(UTC)
        tokens = usage["completion_tokens"] if usage else self.tokens.count(reply)
        usage_json = json.dumps(usage) if usage else None
        async with self.pool.acquire() as conn:
            await conn.execute(
                FINISH,
                reply_id,
                reply,
                "completed",
                tokens,
                usage_json,
                finish,
                "fake",
                now,
                cid,
                claim_seq,
            )


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
]


def _event(index: int, name: str, data: dict[str, Any]) -> dict[str, Any]:
    frame = f"event: {name}\ndata: {json.dumps(data)}\nid: {index}\n\n".encode()
    return {"type": "http.response.body", "body": frame, "more_body": True}


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send: Any, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--llm-url", required=True)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    url = args.database_url.replace("postgresql+asyncpg://", "postgresql://")
    app = Reference(url, args.llm_url, args.pool_size)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
