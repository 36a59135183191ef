"""Small helpers for chat tests: sending messages, reading SSE streams, waiting for locks."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import httpx
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID
from chatbot_api.chat import service
from chatbot_api.conversations.models import Conversation, MessageStatus
from chatbot_api.sql import Tx, run_transaction
from chatbot_api.testing.fake_llm import FakeLLM

T = TypeVar("T")


@dataclass(frozen=True)
class SSEEvent:
    event: str
    id: str | None
    data: dict[str, Any]


def parse_sse(body: str) -> list[SSEEvent]:
    """Parse a complete text/event-stream body (LF line endings, as the server writes)."""
    events: list[SSEEvent] = []
    for block in body.split("\n\n"):
        name, event_id, data_lines = "message", None, []
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "id":
                event_id = value
            elif field == "data":
                data_lines.append(value)
        if data_lines:
            events.append(SSEEvent(name, event_id, json.loads("\n".join(data_lines))))
    return events


async def upstream_called(fake_llm: FakeLLM) -> None:
    """Until the first request's turn is under way (its upstream call has begun): a request
    sent after a fixed delay instead could outrun it on a loaded machine."""
    async with asyncio.timeout(5):
        while not fake_llm.requests:  # noqa: ASYNC110 (the fake has no arrival event)
            await asyncio.sleep(0.01)


async def send(client: httpx.AsyncClient, conversation_id: str, message: str) -> httpx.Response:
    return await client.post(
        f"/api/v1/conversations/{conversation_id}/messages", json={"message": message}
    )


async def send_stream(
    client: httpx.AsyncClient, conversation_id: str, message: str
) -> tuple[httpx.Response, list[SSEEvent]]:
    response = await client.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        json={"message": message, "stream": True},
    )
    return response, parse_sse(response.text)


async def messages(client: httpx.AsyncClient, conversation_id: str) -> list[dict[str, Any]]:
    """Every stored message of the conversation, oldest first (all pages)."""
    data: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        response = await client.get(
            f"/api/v1/conversations/{conversation_id}/messages", params=params
        )
        assert response.status_code == 200, response.text
        page = response.json()
        data += page["data"]
        if not page["has_more"]:
            return data
        params["after"] = page["next_cursor"]


async def lock_waiters(engine: AsyncEngine, count: int) -> None:
    """Until `count` sessions of this database wait for a row lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    async with asyncio.timeout(5):
        while True:
            async with engine.connect() as connection:
                if await connection.scalar(query) >= count:
                    return
            await asyncio.sleep(0.02)


async def begin_a_turn(
    engine: AsyncEngine,
    *,
    durable: bool = True,
    then: Callable[[Tx], Awaitable[T]] | None = None,
    conversation_id: uuid.UUID | None = None,
) -> service.BegunTurn:
    """A turn started straight through the service, in a new conversation unless given one
    (`durable` as `begin_turn`'s). `then` runs in the start's transaction, after it."""
    if conversation_id is None:
        conversation_id = uuid.uuid4()
        async with engine.begin() as connection:
            await connection.execute(
                insert(Conversation).values(
                    id=conversation_id, owner_id=LOCAL_PRINCIPAL_ID, next_seq=1
                )
            )
    budget = service.TokenBudget(4096, 512, 4, lambda text: len(text) // 4 + 1, 1.0)

    async def start(tx: Tx) -> service.BegunTurn:
        begun = await service.begin_turn(
            tx,
            conversation_id=conversation_id,
            owner_id=LOCAL_PRINCIPAL_ID,
            text="hello",
            text_tokens=2,
            budget=budget,
            default_system_prompt="Be brief.",
            model_used="m",
            lease=timedelta(seconds=60),
            durable=durable,
        )
        if then is not None:
            await then(tx)
        return begun

    return await run_transaction(engine, start)


async def finish(tx: Tx, *, turn: service.BegunTurn) -> bool:
    return await service.finish_turn(
        tx,
        turn=turn,
        content="Hi.",
        status=MessageStatus.COMPLETED,
        token_count=1,
        usage=None,
        finish_reason="stop",
        error=None,
        model_used="m",
    )
