"""The checkpointer: one task per process (started by the app's lifespan) that keeps the turns
generating here durable and answerable, in one short transaction per tick for all of them:

- every `stream_checkpoint_interval` seconds, the partial replies that grew are stored, so a
  crash loses at most one interval of text and a follower in another process sees it grow;
- cancel requests made through another process (a flag on the reply's row) are picked up;
- every third of the conversation lease, the claims on their conversations are renewed, so a
  long generation keeps its conversation while a dead process's claims run out.

One transaction per tick whatever the number of turns: a task and a transaction per turn per
second had exhausted the pool under load. Once the process is idle, freed memory goes back
to the system (`memory.release_freed_memory`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import uuid
from datetime import timedelta

from chatbot_api.chat import service
from chatbot_api.chat.turn import Turn
from chatbot_api.chat.turns import TurnManager
from chatbot_api.memory import release_freed_memory
from chatbot_api.sql import Tx, run_transaction

logger = logging.getLogger(__name__)

# Freed memory goes back to the system after this many ticks with no turn in flight, then
# once more after this many idle seconds: by then the provider's idle keep-alive connections
# are closed too (`llm.http` closes them 15 s after their last use), and what they held is
# freed. After 1,000 streams the second trim gave back about 5 MB more.
IDLE_TICKS_BEFORE_TRIM = 3
IDLE_SECONDS_BEFORE_LATE_TRIM = 40.0


async def checkpoint_forever(turns: TurnManager, *, interval: float) -> None:
    """Checkpoint the turns of `turns` every `interval` seconds (at most a third of the lease),
    until cancelled."""
    loop = asyncio.get_running_loop()
    lease = turns.lease.total_seconds()
    interval = min(interval, lease / 3)
    renew_at = loop.time() + lease / 3
    late = math.ceil(IDLE_SECONDS_BEFORE_LATE_TRIM / interval)
    trim_at = {IDLE_TICKS_BEFORE_TRIM, max(IDLE_TICKS_BEFORE_TRIM + 1, late)}
    idle_ticks = 0
    while True:
        await asyncio.sleep(interval)
        renewed = await _tick(turns, renew=loop.time() >= renew_at)
        if renewed is None:
            renew_at = loop.time() + lease / 3
            idle_ticks += 1
            if idle_ticks in trim_at:
                release_freed_memory()
            continue
        idle_ticks = 0
        if renewed:
            renew_at = loop.time() + lease / 3


async def _tick(turns: TurnManager, *, renew: bool) -> bool | None:
    """One checkpoint: None if no turn was in flight, else whether the claims were renewed.
    The turns are held by this function's locals only, so they end with the tick: an idle
    process keeps no finished turn (nor its log of every delta) alive."""
    live = turns.live()
    if not live:
        return None
    partials = [(t, t.text_length) for t in live if t.text_length != t.stored_length]
    claims = [(b.conversation_id, b.claim_seq) for t in live if (b := t.begun)] if renew else None
    tick = functools.partial(_checkpoint, partials=partials, claims=claims, lease=turns.lease)
    try:
        cancelled = await run_transaction(turns.engine, tick, urgent=True)
    except Exception as exc:
        logger.warning("checkpoint of %d turns failed: %s", len(live), type(exc).__name__)
        return False
    for turn, length in partials:
        turn.stored_length = length
    turns.cancel_asked(cancelled)
    return claims is not None


async def _checkpoint(
    tx: Tx,
    *,
    partials: list[tuple[Turn, int]],
    claims: list[tuple[uuid.UUID, int]] | None,
    lease: timedelta,
) -> set[uuid.UUID]:
    # Conversations first, then replies: the order in which a turn storing its reply locks
    # the same two rows (`statements.FINISH_AND_RELEASE` updates the conversation in its main
    # statement, and the reply in its WITH after it). Replies first, a renewing checkpoint
    # and a finishing turn deadlocked under load, and PostgreSQL aborted one of them.
    if claims:
        await service.renew_claims(tx, claims, lease=lease)
    await service.store_partials(tx, [(t.ids.assistant_message_id, t.text()) for t, _ in partials])
    return await service.cancel_requested(tx)
