"""The per-process checkpointer: while a reply is generated, its partial text reaches the
database and its claim on the conversation is renewed, however many leases the turn lasts."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.chat import checkpoints, service, statements
from chatbot_api.chat.outcomes import TurnIds
from chatbot_api.chat.turn import Turn
from chatbot_api.chat.turns import TurnManager
from chatbot_api.conversations.models import Conversation, Message
from chatbot_api.errors import is_transient_db_error
from chatbot_api.memory import release_freed_memory
from chatbot_api.sql import Tx, run_transaction
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import begin_a_turn, finish, lock_waiters, send
from tests.conftest import client_for, create_conversation

T = TypeVar("T")

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


class _IdleTurns:
    """What the checkpointer reads of a `TurnManager` with nothing in flight: it counts the
    ticks, and says when `until` have passed."""

    lease = timedelta(seconds=60)

    def __init__(self, until: int) -> None:
        self.ticks = 0
        self.until = until
        self.passed = asyncio.Event()

    def live(self) -> list[Turn]:
        self.ticks += 1
        if self.ticks >= self.until:
            self.passed.set()
        return []


class TestTrimSchedule:
    async def test_an_idle_process_trims_soon_then_once_more_later(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Powers of two: 0.25 s of 1/64 s ticks is exactly 16 of them.
        monkeypatch.setattr(checkpoints, "IDLE_SECONDS_BEFORE_LATE_TRIM", 0.25)
        turns = _IdleTurns(until=40)
        trimmed: list[int] = []
        monkeypatch.setattr(
            checkpoints, "release_freed_memory", lambda: trimmed.append(turns.ticks)
        )
        task = asyncio.create_task(
            checkpoints.checkpoint_forever(cast(TurnManager, turns), interval=1 / 64)
        )
        try:
            async with asyncio.timeout(10):
                await turns.passed.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        assert trimmed == [checkpoints.IDLE_TICKS_BEFORE_TRIM, 16]


class TestRenewal:
    async def test_a_claim_released_before_its_renewal_stays_released(
        self, engine: AsyncEngine
    ) -> None:
        # The checkpointer collects the claims, then the turn finishes and releases its
        # conversation, then the checkpoint's transaction runs: it must not claim it again.
        begun = await begin_a_turn(engine)
        conversation_id = begun.conversation_id
        claims = [(begun.conversation_id, begun.claim_seq)]
        await run_transaction(engine, functools.partial(finish, turn=begun))

        await run_transaction(
            engine, lambda tx: service.renew_claims(tx, claims, lease=timedelta(seconds=60))
        )

        busy_until, _ = await claim_and_partial(engine, str(conversation_id))
        assert busy_until is None


async def reply_free_while_waiting(
    engine: AsyncEngine, begun: service.BegunTurn, work: Callable[[], Coroutine[Any, Any, T]]
) -> tuple[Any, T]:
    """Run `work` while another session holds the turn's conversation row, and once it waits
    for that lock, try to lock the reply's row without waiting (NOWAIT fails at once if
    `work` holds it already). The reply's id if it was free, and what `work` returned."""
    async with engine.connect() as holder:
        await holder.execute(
            select(Conversation.id)
            .where(Conversation.id == begun.conversation_id)
            .with_for_update()
        )
        waiting = asyncio.create_task(work())
        await lock_waiters(engine, 1)
        async with engine.connect() as probe:
            locked = await probe.scalar(
                select(Message.id)
                .where(Message.id == begun.assistant_message_id)
                .with_for_update(nowait=True)
            )
            await probe.rollback()
        await holder.rollback()
    return locked, await waiting


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
class TestLockOrder:
    """A checkpoint that renews claims and a turn storing its reply lock the same two rows:
    the conversation, then the reply (`FINISH_AND_RELEASE` updates the conversation in its
    main statement and the reply in its WITH, after it). The checkpoint must take them in
    that order too: the other way round they deadlocked under load (S3's 1,000 streams), and
    PostgreSQL aborted the turn's statement, so its reply was not stored."""

    async def test_a_checkpoint_waiting_for_a_conversation_holds_no_reply(
        self, engine: AsyncEngine
    ) -> None:
        begun = await begin_a_turn(engine)
        ids = TurnIds(begun.conversation_id, begun.user_message_id, begun.assistant_message_id)
        turn = Turn(ids=ids, model_used="m", begun=begun)
        turn.publish_delta("partial text")
        tick = functools.partial(
            checkpoints._checkpoint,
            partials=[(turn, turn.text_length)],
            claims=[(begun.conversation_id, begun.claim_seq)],
            lease=timedelta(seconds=60),
        )
        locked, cancels = await reply_free_while_waiting(
            engine, begun, lambda: run_transaction(engine, tick, urgent=True)
        )
        assert locked == begun.assistant_message_id
        assert cancels == set()
        _, partial = await claim_and_partial(engine, str(begun.conversation_id))
        assert partial == "partial text"

    async def test_a_finishing_turn_waiting_for_its_conversation_holds_no_reply(
        self, engine: AsyncEngine
    ) -> None:
        # The order the checkpoint's is matched to; RETURNING, which counts the stored
        # replies, runs the reply's UPDATE only once the conversation's row is updated.
        begun = await begin_a_turn(engine)
        store = functools.partial(finish, turn=begun)
        locked, stored = await reply_free_while_waiting(
            engine,
            begun,
            lambda: run_transaction(engine, store, single_statement=True, urgent=True),
        )
        assert locked == begun.assistant_message_id
        assert stored is True

    async def test_a_deadlock_is_a_transient_error_worth_a_retry(self, engine: AsyncEngine) -> None:
        first, second = await begin_a_turn(engine), await begin_a_turn(engine)
        both_locked = asyncio.Barrier(2)

        async def cross(tx: Tx, *, mine: service.BegunTurn, theirs: service.BegunTurn) -> None:
            for index, turn in enumerate((mine, theirs)):
                await tx.run(
                    statements.RENEW,
                    {
                        "p_id": turn.conversation_id,
                        "p_claim": turn.claim_seq,
                        "p_until": datetime.now(UTC) + timedelta(seconds=60),
                    },
                )
                if index == 0:
                    await both_locked.wait()

        outcomes = await asyncio.gather(
            run_transaction(engine, functools.partial(cross, mine=first, theirs=second)),
            run_transaction(engine, functools.partial(cross, mine=second, theirs=first)),
            return_exceptions=True,
        )

        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1, outcomes
        assert isinstance(errors[0], DBAPIError)
        assert getattr(errors[0].orig, "sqlstate", None) == "40P01"
        assert is_transient_db_error(errors[0])
