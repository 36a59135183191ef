"""The per-process checkpointer: while a reply is generated, its partial text reaches the
database and its claim on the conversation is renewed, however many leases the turn lasts."""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.auth.models import LOCAL_PRINCIPAL_ID
from chatbot_api.chat import service
from chatbot_api.chat.turn import Turn
from chatbot_api.conversations.models import Conversation, Message, MessageStatus
from chatbot_api.memory import release_freed_memory
from chatbot_api.sql import run_transaction
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import send
from tests.conftest import client_for, create_conversation

# Renewed every third of it: a stall of up to two thirds (0.67 s) on a loaded machine is fine.
LEASE = 1.0


async def claim_and_partial(engine: AsyncEngine, conversation: str) -> tuple[Any, str]:
    conversation_id = uuid.UUID(conversation)
    async with engine.connect() as connection:
        busy_until = await connection.scalar(
            select(Conversation.busy_until).where(Conversation.id == conversation_id)
        )
        partial = await connection.scalar(
            select(Message.content).where(
                Message.conversation_id == conversation_id, Message.role == "assistant"
            )
        )
    return busy_until, partial or ""


class TestCheckpointer:
    async def test_a_turn_longer_than_its_lease_keeps_its_claim_and_stores_its_partial(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM, engine: AsyncEngine
    ) -> None:
        app = await app_factory(
            reliability={"conversation_lease_seconds": LEASE, "stream_checkpoint_interval": 0.1}
        )
        deltas = tuple(f"w{i} " for i in range(50))
        fake_llm.enqueue(Script(deltas=deltas, token_delay=0.05))  # 2.5 s: 2.5 leases
        samples: list[tuple[datetime, Any, str]] = []
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            turn = asyncio.create_task(send(client, conversation_id, "a long one, please"))
            for _ in range(20):
                await asyncio.sleep(0.1)
                samples.append(
                    (datetime.now(UTC), *await claim_and_partial(engine, conversation_id))
                )
            concurrent = await send(client, conversation_id, "me too")
            response = await turn

        assert response.status_code == 200, response.text
        assert concurrent.status_code == 409, concurrent.text
        # Well past the first lease, the claim was still ahead of the clock at every sample.
        assert all(busy is not None and busy > at for at, busy, _ in samples)
        partials = [len(partial) for _, _, partial in samples]
        assert partials == sorted(partials)
        assert 0 < partials[5] < partials[-1] < len("".join(deltas))
        busy_until, stored = await claim_and_partial(engine, conversation_id)
        assert (busy_until, stored) == (None, "".join(deltas))

    async def test_an_idle_process_keeps_no_finished_turn_alive(
        self, app_factory: Callable[..., Any], fake_llm: FakeLLM
    ) -> None:
        # The last checkpoint before the process went idle saw this turn's partial text; the
        # finished turn (and its log of every delta) must not outlive that tick.
        app = await app_factory(reliability={"stream_checkpoint_interval": 0.05})
        fake_llm.enqueue(Script(deltas=tuple(f"w{i} " for i in range(20)), token_delay=0.02))
        async with client_for(app) as client:
            conversation_id = uuid.UUID(await create_conversation(client))
            response = await send(client, str(conversation_id), "a few words, please")
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.3)  # idle ticks

        gc.collect()
        alive = [
            o
            for o in gc.get_objects()
            if isinstance(o, Turn) and o.ids.conversation_id == conversation_id
        ]
        assert alive == []
        assert app.state.turns.in_flight == 0


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class TestReleaseFreedMemory:
    def test_freed_heap_goes_back_to_the_system(self) -> None:
        # 200 MB of malloc'd buffers (over pymalloc's 512 bytes), one in 50 kept: the heap
        # is riddled with free chunks that glibc keeps unless told to trim.
        blobs = [bytes(1000) + bytes([i % 256]) for i in range(200_000)]
        kept = blobs[::50]
        del blobs
        before = rss_mb()

        release_freed_memory()

        assert before - rss_mb() > 100, (before, rss_mb())
        assert len(kept) == 4_000


class TestRenewal:
    async def test_a_claim_released_before_its_renewal_stays_released(
        self, engine: AsyncEngine
    ) -> None:
        # The checkpointer collects the claims, then the turn finishes and releases its
        # conversation, then the checkpoint's transaction runs: it must not claim it again.
        async with engine.begin() as connection:
            conversation_id = uuid.uuid4()
            await connection.execute(
                insert(Conversation).values(
                    id=conversation_id, owner_id=LOCAL_PRINCIPAL_ID, next_seq=1
                )
            )
        budget = service.TokenBudget(4096, 512, 4, lambda text: len(text) // 4 + 1, 1.0)
        begun = await run_transaction(
            engine,
            lambda tx: service.begin_turn(
                tx,
                conversation_id=conversation_id,
                owner_id=LOCAL_PRINCIPAL_ID,
                text="hello",
                text_tokens=2,
                budget=budget,
                default_system_prompt="Be brief.",
                model_used="m",
                lease=timedelta(seconds=60),
            ),
        )
        claims = [(begun.conversation_id, begun.claim_seq)]
        await run_transaction(
            engine,
            lambda tx: service.finish_turn(
                tx,
                turn=begun,
                content="Hi.",
                status=MessageStatus.COMPLETED,
                token_count=1,
                usage=None,
                finish_reason="stop",
                error=None,
                model_used="m",
            ),
        )

        await run_transaction(
            engine, lambda tx: service.renew_claims(tx, claims, lease=timedelta(seconds=60))
        )

        busy_until, _ = await claim_and_partial(engine, str(conversation_id))
        assert busy_until is None
