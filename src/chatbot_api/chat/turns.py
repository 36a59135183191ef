"""Running turns: each one is an asyncio task, decoupled from the HTTP request that started it.

A turn's lifetime, in order:

1. `TurnManager.start()` runs the first short transaction (`service.begin_turn`) in the
   caller's task, so 404 / 409 / 422 reach the client as plain HTTP errors and nothing is
   stored when they happen. Like all new work it holds at most all but one of the pool's
   connections (`pool.KeepOneForUrgentWork`), so under load the backlog queues
   for that, not ahead of replies to store.
2. A background task calls the provider with no database connection checked out, appending
   each event to the turn's in-memory log as it arrives.
3. One checkpointer per process (`chat.checkpoints`), not one per turn, stores the partial
   replies of every turn in flight, picks up cancel requests made in other processes, and
   renews the claims on their conversations: one short transaction per tick whatever the
   number of turns, so the pool never caps how many chats are in flight.
4. When the provider stops, the task stores the reply in a final short transaction
   (`service.finish_turn`, retried while the database is briefly away), and only then appends
   the terminal event. A client that disconnects after the last token therefore loses
   nothing, and one that disconnects earlier does not stop the generation.

Any reader follows a turn's log from any position (`chat.events`): the SSE response, the
non-streaming response, a resumed stream and an idempotent retry all see the same events.
A turn running in another process is followed by polling its row (`_follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.chat import service
from chatbot_api.chat.outcomes import (
    TurnIds,
    created_event,
    stored_error,
    terminal_event,
    usage_dict,
)
from chatbot_api.chat.turn import Turn, follow
from chatbot_api.config import Settings
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.db import new_id
from chatbot_api.errors import (
    AppError,
    ConversationBusy,
    GenerationCancelled,
    GenerationInterrupted,
    IdempotencyInFlight,
    MessageTooLong,
    NotFound,
    ReplyNotStored,
    UpstreamError,
    is_transient_db_error,
)
from chatbot_api.llm.base import Finish, GenerationOptions, Provider, Routed, TextDelta, Usage
from chatbot_api.llm.errors import ProviderError, ProviderUnavailable
from chatbot_api.sql import Tx, run_transaction

logger = logging.getLogger(__name__)

# Storing the final reply is retried while the database is briefly away (a restart).
PERSIST_ATTEMPTS = 6
PERSIST_BACKOFF = 0.25
PERSIST_BACKOFF_CAP = 2.0
# How long stopping waits for turns that are cut short to store what they have.
FINISH_TIMEOUT = 10.0
# How long a failed start waits for the database to take it back before answering.
UNDO_TIMEOUT = 6.0
REAP_INTERVAL = 30.0


class TurnManager:
    """Starts, follows and cancels turns, and keeps their tasks alive. Created in the app's
    lifespan, which also drains it on shutdown."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        provider: Provider,
        settings: Settings,
    ) -> None:
        self._engine = engine
        self._provider = provider
        self._settings = settings
        self._turns: dict[uuid.UUID, Turn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease = timedelta(seconds=settings.reliability.conversation_lease_seconds)

    @property
    def in_flight(self) -> int:
        return len(self._turns)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def lease(self) -> timedelta:
        """How long a claim on a conversation lasts unless it is renewed."""
        return self._lease

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(
        self,
        conversation_id: uuid.UUID,
        text: str,
        *,
        owner_id: uuid.UUID,
        model: str | None = None,
        max_tokens: int | None = None,
        idempotency: service.IdempotentRequest | None = None,
        attach_if_running: bool = True,
        durable_start: bool = True,
    ) -> Turn:
        """Begin a turn. A retry of a request already seen with the same `idempotency` key is
        answered from the first one instead of calling the provider again. `owner_id` must
        own the conversation (404 otherwise); `model` and `max_tokens` were already checked
        against the allowlist and the cap (`limits.service`).

        `durable_start=False` where the client is told nothing before the reply is stored
        (no stream): the start then commits without waiting for the disk
        (`service.begin_turn`'s `durable`)."""
        limit = self._settings.limits.max_message_chars
        if len(text) > limit:
            raise MessageTooLong(f"The message is over the limit of {limit} characters.")
        provider = self._provider
        budget = service.TokenBudget(
            context_window=provider.context_window,
            reply_tokens=min(
                max_tokens or self._settings.llm.max_tokens, provider.context_window // 2
            ),
            per_message=provider.message_overhead(),
            count=provider.count_tokens,
            tokens_per_byte=provider.max_tokens_per_byte(),
        )
        text_tokens = provider.count_tokens(text)
        model_used = model or provider.model

        begin_turn = functools.partial(
            service.begin_turn,
            conversation_id=conversation_id,
            owner_id=owner_id,
            text=text,
            text_tokens=text_tokens,
            budget=budget,
            default_system_prompt=self._settings.default_system_prompt,
            model_used=model_used,
            lease=self._lease,
            durable=durable_start,
        )

        ttl = timedelta(seconds=self._settings.reliability.idempotency_ttl_seconds)

        async def begin(tx: Tx) -> service.BegunTurn | tuple[uuid.UUID, uuid.UUID]:
            if idempotency is not None:
                earlier = await service.find_idempotent(tx, idempotency)
                if earlier is not None:
                    return earlier
            begun = await begin_turn(tx)
            if idempotency is not None:
                await service.remember_idempotent(tx, idempotency, turn=begun, ttl=ttl)
            return begun

        async def in_transaction() -> service.BegunTurn | tuple[uuid.UUID, uuid.UUID]:
            try:
                return await run_transaction(self._engine, begin)
            except (IntegrityError, ConversationBusy):
                if idempotency is None:
                    raise
                # A request with the same key ran at the same time and stored it after our
                # lookup: this transaction is rolled back (the key taken, or the conversation
                # busy with that request's turn), and the next one replays that request.
                return await run_transaction(self._engine, begin)

        begun: service.BegunTurn | tuple[uuid.UUID, uuid.UUID]
        message_ids = (new_id(), new_id())
        started = False  # a connection was checked out and the statement may have been sent

        async def standalone(tx: Tx) -> service.BegunTurn:
            nonlocal started
            started = True
            return await begin_turn(
                tx,
                standalone=True,
                remember=None if idempotency is None else service.Remember(idempotency, ttl),
                message_ids=message_ids,
            )

        try:
            # Usually one statement with no BEGIN or COMMIT around it, which stores the key
            # too: one round trip instead of three, or five with a key.
            begun = await run_transaction(self._engine, standalone, single_statement=True)
        except service.NeedsTransaction:
            # A prompt not known to fit, or a key already stored: nothing was stored.
            begun = await in_transaction()
        except IntegrityError:
            if idempotency is None:
                raise
            # A request racing with this one stored the key first: the statement failed whole.
            begun = await in_transaction()
        except (NotFound, ConversationBusy):
            raise  # the claim matched nothing: nothing was stored
        except BaseException:
            # Anything else may have come after the statement committed: its connection broke
            # while it ran (a database restart), a later page of history failed, the request
            # was cancelled. Take it back, so that a failed start stores nothing and leaves no
            # claim behind for the client's retry to run into. (No connection, nothing sent:
            # the 503 goes out at once.)
            if started:
                await asyncio.shield(self._undo_start(conversation_id, message_ids))
            raise
        if not isinstance(begun, service.BegunTurn):
            replay = await self.attach(*begun)
            if not replay.done and not attach_if_running:
                raise IdempotencyInFlight()
            return replay
        ids = TurnIds(begun.conversation_id, begun.user_message_id, begun.assistant_message_id)
        turn = Turn(ids=ids, model_used=model_used, begun=begun)
        turn.publish(created_event(ids, turn.model_used))
        self._turns[ids.assistant_message_id] = turn
        turn.task = self._spawn(self._run(turn, budget.reply_tokens, model), f"turn-{ids}")
        return turn

    async def _undo_start(
        self, conversation_id: uuid.UUID, message_ids: tuple[uuid.UUID, uuid.UUID]
    ) -> None:
        """`service.undo_start`, retried while the database is briefly away, for up to
        `UNDO_TIMEOUT`. If it stays away, a start that did commit keeps its conversation until
        the claim lapses (and the reaper then marks its reply `incomplete`)."""
        undo = functools.partial(
            service.undo_start, conversation_id=conversation_id, message_ids=message_ids
        )
        what = f"take back the start of turn {message_ids[1]}"
        try:
            async with asyncio.timeout(UNDO_TIMEOUT):
                await self._retried(undo, what)
        except TimeoutError:
            logger.error("could not %s: TimeoutError", what)

    async def attach(self, conversation_id: uuid.UUID, message_id: uuid.UUID) -> Turn:
        """The turn that produces `message_id`: live in this process, finished (rebuilt from
        its row), or running elsewhere (followed through its row). `NotFound` otherwise."""
        live = self._turns.get(message_id)
        if live is not None and live.ids.conversation_id == conversation_id:
            return live
        message, user_id = await run_transaction(
            self._engine, lambda tx: service.load_reply(tx, conversation_id, message_id)
        )
        turn = Turn(
            ids=TurnIds(conversation_id, user_id, message.id), model_used=message.model_used or ""
        )
        turn.publish(created_event(turn.ids, turn.model_used))
        if message.status == MessageStatus.STREAMING:
            turn.task = self._spawn(
                follow(turn, self._engine, deadline=self._settings.llm.total_timeout + 60),
                f"follow-{message_id}",
            )
        else:
            turn.publish_stored(message)
        return turn

    async def cancel(self, conversation_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Stop a generation in progress and wait (briefly) until its reply is stored as
        `cancelled`. Idempotent: a finished reply is left as it is."""
        live = self._turns.get(message_id)
        if live is not None and live.ids.conversation_id == conversation_id:
            self._cancel_local(live)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await live.outcome()
            return

        async def request(tx: Tx) -> bool:
            message, _ = await service.load_reply(tx, conversation_id, message_id)
            if message.status != MessageStatus.STREAMING:
                return False
            await service.request_cancel(tx, reply_id=message.id)
            return True

        if not await run_transaction(self._engine, request):
            return
        # Another process owns the turn; it sees the request at its next checkpoint.
        follower = await self.attach(conversation_id, message_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.reliability.stream_checkpoint_interval + 4):
                await follower.outcome()
        if follower.task is not None:
            follower.task.cancel()

    def _cancel_local(self, turn: Turn) -> None:
        if turn.task is not None and not turn.finishing and not turn.cancel_requested:
            turn.cancel_requested = True
            turn.task.cancel()

    async def _run(self, turn: Turn, reply_tokens: int, model: str | None = None) -> None:
        assert turn.begun is not None
        provider = self._provider
        usage: Usage | None = None
        finish: str | None = None
        error: ProviderError | None = None
        status: MessageStatus | None = None
        options = GenerationOptions(
            max_tokens=reply_tokens, temperature=self._settings.llm.temperature, model=model
        )
        try:
            async for event in provider.stream(turn.take_context(), options):
                if type(event) is TextDelta:
                    turn.publish_delta(event.text)
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Finish):
                    finish = event.reason
                elif isinstance(event, Routed):
                    turn.model_used = event.model
                    turn.attempts, turn.fallbacks = event.attempts, event.fallbacks
        except ProviderError as exc:
            error = exc
        except asyncio.CancelledError:
            if not turn.cancel_requested:
                # Shutdown cut this turn short: keep what was generated, then stop.
                error = ProviderUnavailable("the server shut down before the reply was finished")
                await asyncio.shield(self._finish(turn, usage, None, error, interrupted=True))
                raise
            # Our own cancel: the provider stream is closed; store what we have.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            status = MessageStatus.CANCELLED
        except Exception as exc:  # a bug in a provider: never leave the row `streaming`
            logger.exception("provider %s raised an unexpected error", provider.name)
            error = ProviderError(f"provider failed: {type(exc).__name__}")
        if usage is not None:
            provider.observe_usage(turn.begun.prompt_tokens, usage)
        await self._finish(turn, usage, finish, error, status)

    def live(self) -> list[Turn]:
        """The turns generating in this process whose replies are not being stored yet."""
        return [t for t in self._turns.values() if t.begun is not None and not t.finishing]

    def cancel_asked(self, reply_ids: set[uuid.UUID]) -> None:
        """Cancel the turns of this process that another one was asked to cancel."""
        for reply_id in reply_ids:
            if (asked := self._turns.get(reply_id)) is not None:
                self._cancel_local(asked)

    async def _finish(
        self,
        turn: Turn,
        usage: Usage | None,
        finish: str | None,
        error: ProviderError | None,
        status: MessageStatus | None = None,
        *,
        interrupted: bool = False,
    ) -> None:
        assert turn.begun is not None
        turn.finishing = True
        text = turn.text()
        if status is None:
            if error is None and finish is not None:
                status = MessageStatus.COMPLETED
            elif text:
                status = MessageStatus.INCOMPLETE
            else:
                status = MessageStatus.FAILED
        app_error: AppError | None = None
        if status is MessageStatus.CANCELLED:
            app_error = GenerationCancelled("The generation was cancelled.")
        elif interrupted:
            app_error = GenerationInterrupted("The server stopped before the reply was finished.")
        elif status is not MessageStatus.COMPLETED:
            app_error = UpstreamError.from_provider(
                error or ProviderUnavailable("the upstream stream ended before the reply was done")
            )
        if status is not MessageStatus.COMPLETED and finish is None:
            # Every stored reply says why it ended, even when the upstream never did.
            finish = (
                "cancelled"
                if status is MessageStatus.CANCELLED
                else "interrupted"
                if interrupted
                else "error"
            )
        completion_tokens = usage.completion_tokens if usage else self._provider.count_tokens(text)
        if usage is None and status is MessageStatus.CANCELLED:
            # A cancelled stream never reaches the provider's usage chunk: count it ourselves.
            prompt = turn.begun.prompt_tokens
            usage = Usage(prompt, completion_tokens, prompt + completion_tokens)
        not_stored = await self._persist(
            turn, text, status, completion_tokens, usage, finish, stored_error(app_error)
        )
        if not_stored is not None:
            # The reply could not be stored: say so rather than report a success we lost.
            status, app_error = MessageStatus.FAILED, not_stored
        turn.error = app_error
        turn.usage = usage
        self._turns.pop(turn.ids.assistant_message_id, None)
        turn.publish(
            terminal_event(
                turn.ids,
                text=text,
                status=status,
                model_used=turn.model_used,
                finish_reason=finish,
                usage=usage_dict(usage),
                error=stored_error(app_error),
                attempts=turn.attempts,
                fallbacks=turn.fallbacks,
            )
        )

    async def _persist(
        self,
        turn: Turn,
        text: str,
        status: MessageStatus,
        token_count: int,
        usage: Usage | None,
        finish: str | None,
        error: dict[str, object] | None,
    ) -> ReplyNotStored | None:
        """Store the reply: None once it is, else the error to report."""
        begun = turn.begun
        assert begun is not None
        kept = True

        async def store(tx: Tx) -> None:
            nonlocal kept
            kept = await service.finish_turn(
                tx,
                turn=begun,
                content=text,
                status=status,
                token_count=token_count,
                usage=usage,
                finish_reason=finish,
                error=error,
                model_used=turn.model_used,
            )

        # On PostgreSQL one statement, so a retry is safe (`finish_turn`).
        if not await self._retried(store, f"store reply {turn.ids}"):
            return ReplyNotStored("The reply could not be stored; the database is unavailable.")
        if kept:
            return None
        logger.error("the start of turn %s is gone: its reply cannot be stored", turn.ids)
        return ReplyNotStored(
            "The reply could not be stored: the database lost this turn's start (it crashed "
            "during the turn). Send the message again."
        )

    async def _retried(self, work: Callable[[Tx], Awaitable[None]], what: str) -> bool:
        """`work`, one statement on PostgreSQL that is safe to run again, retried while the
        database is briefly away (a restart): False, logged, if it never got through."""
        for attempt in range(PERSIST_ATTEMPTS):
            try:
                await run_transaction(self._engine, work, single_statement=True, urgent=True)
                return True
            except Exception as exc:
                if not is_transient_db_error(exc) or attempt == PERSIST_ATTEMPTS - 1:
                    logger.error("could not %s: %s", what, type(exc).__name__)
                    return False
                await asyncio.sleep(min(PERSIST_BACKOFF * 2**attempt, PERSIST_BACKOFF_CAP))
        return False  # pragma: no cover - the loop always returns

    async def reap_forever(self) -> None:
        """Mark orphaned `streaming` rows `incomplete`, at start and then periodically."""
        while True:
            try:
                async with self._engine.begin() as conn:
                    reaped = await service.reap_orphans(conn)
                if reaped:
                    logger.warning("marked %d interrupted replies incomplete", reaped)
            except Exception as exc:
                logger.warning("reaper failed: %s", type(exc).__name__)
            await asyncio.sleep(REAP_INTERVAL)

    async def drain(self, grace: float) -> None:
        """Let running turns finish for up to `grace` seconds, then cut the rest short; a cut
        turn stores its partial reply as `incomplete` before its task ends."""
        running = {t.task: t for t in self._turns.values() if t.task is not None}
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                if not running[task].finishing:  # a turn storing its reply is let finish
                    task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=FINISH_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
