"""Small helpers for chat tests: sending messages, reading SSE streams, waiting for locks."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM


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
