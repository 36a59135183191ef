"""Many sends to ONE conversation at once, split across two `chatbot-api serve` processes on
one PostgreSQL database: the conversation is claimed by one turn at a time, so each send is
either answered (200) or refused with 409 `conversation_busy`; never a 500. Every answered
send is stored as a completed pair, and the `seq`s are unique and gapless.

200 sends run in `make test`; 1,000 in `make chaos`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chaos import (
    Ack,
    ServerPool,
    audit,
    create_conversation,
)

logger = logging.getLogger(__name__)

SERVER_ENV = {
    # The burst queues for the pool; a 503 for a slow checkout is not what is tested here.
    "DB_POOL_TIMEOUT": "60",
}


async def burst(servers: ServerPool, engine: AsyncEngine, postgres_url: str, sends: int) -> None:
    processes = await asyncio.gather(
        *(servers.start(postgres_url, env=SERVER_ENV) for _ in range(2))
    )
    limits = httpx.Limits(max_connections=sends, max_keepalive_connections=sends)
    clients = [
        httpx.AsyncClient(base_url=s.base_url, timeout=120, limits=limits) for s in processes
    ]
    try:
        # On its own connection: every send of the burst opens a fresh one, so none can race
        # the server closing an idle keep-alive connection.
        async with httpx.AsyncClient(base_url=processes[0].base_url, timeout=30) as http:
            conversation_id = await create_conversation(http)
        start = asyncio.Event()

        async def send(i: int) -> tuple[int | str, str, Ack | None]:
            await start.wait()  # every send is in flight at once
            try:
                response = await clients[i % 2].post(
                    f"/api/v1/conversations/{conversation_id}/messages",
                    json={"message": f"send {i}"},
                )
            except httpx.TransportError as exc:
                return "broken", f"{type(exc).__name__} from server {i % 2}", None
            body = response.json()
            if response.status_code != 200:
                return response.status_code, body.get("error", {}).get("code", ""), None
            ack = Ack(
                conversation_id,
                f"send {i}",
                body["user_message_id"],
                body["assistant_message_id"],
                body["response"],
            )
            return 200, "", ack

        tasks = [asyncio.create_task(send(i)) for i in range(sends)]
        await asyncio.sleep(0)
        start.set()
        async with asyncio.timeout(300):
            outcomes = await asyncio.gather(*tasks)
        result = await audit(engine, [conversation_id], [a for *_, a in outcomes if a])
    finally:
        for client in clients:
            await client.aclose()

    codes = Counter((status, code) for status, code, _ in outcomes)
    acknowledged = codes[(200, "")]
    figures = {
        "sent": sends,
        "acknowledged": acknowledged,
        "codes": dict(codes),
        "lost": len(result.lost),
        "duplicated": len(result.duplicated),
        "seq_problems": result.seq_problems,
        "stored_pairs": result.stored_pairs,
    }
    logger.info("concurrency: %s", figures)
    assert set(codes) <= {(200, ""), (409, "conversation_busy")}, figures
    assert acknowledged >= 1, figures
    assert result.lost == [], figures
    assert result.duplicated == [], figures
    assert result.seq_problems == [], figures
    # Nothing was stored for a refused send.
    assert result.stored_pairs == acknowledged, figures


class TestOneConversationManySends:
    async def test_two_hundred_sends_through_two_servers(
        self, engine: AsyncEngine, servers: ServerPool, fake_llm: FakeLLM, postgres_url: str
    ) -> None:
        fake_llm.default = Script(reply="One at a time.", ttft=0.05)
        await burst(servers, engine, postgres_url, 200)

    @pytest.mark.chaos
    async def test_one_thousand_sends_through_two_servers(
        self,
        engine: AsyncEngine,
        servers: ServerPool,
        fake_llm: FakeLLM,
        postgres_url: str,
    ) -> None:
        fake_llm.default = Script(reply="One at a time.", ttft=0.05)
        await burst(servers, engine, postgres_url, 1000)
