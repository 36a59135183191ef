"""Running turns: each one is an asyncio task, decoupled from the HTTP request that started it.

A turn's lifetime, in order:

1. `TurnManager.start()` runs the first short transaction (`service.begin_turn`) in the
   caller's task, so 404 / 409 / 422 reach the client as plain HTTP errors and nothing is
   stored when they happen.
2. A background task calls the provider with no database connection checked out, appending
   each event to the turn's in-memory log as it arrives.
3. When the provider stops, the task stores the reply in a second short transaction
   (`service.finish_turn`), and only then appends the terminal event. A client that
   disconnects after the last token therefore loses nothing, and a client that disconnects
   earlier does not stop the generation: the reply is still completed and stored.

Readers (`Turn.events()`) follow the log from any position, so the SSE response, the
non-streaming response and later re-attachments all see the same events in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot_api.chat import service
from chatbot_api.chat.schemas import ChatResponse, MessageCreated, MessageDelta, TurnError
from chatbot_api.config import Settings
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.conversations.schemas import Usage as UsageOut
from chatbot_api.errors import (
    AppError,
    MessageTooLong,
    ReplyNotStored,
    UpstreamError,
    is_transient_db_error,
)
from chatbot_api.llm.base import (
    Finish,
    GenerationOptions,
    Provider,
    Routed,
    TextDelta,
    Usage,
)
from chatbot_api.llm.errors import ProviderError, ProviderUnavailable

logger = logging.getLogger(__name__)

CREATED = "message.created"
DELTA = "message.delta"
COMPLETED = "message.completed"
INCOMPLETE = "message.incomplete"
FAILED = "message.failed"
TERMINAL = frozenset({COMPLETED, INCOMPLETE, FAILED})

# How often, and how long, storing the final reply is retried before the client is told.
PERSIST_ATTEMPTS = 4
PERSIST_BACKOFF = 0.25


@dataclass(frozen=True, slots=True)
class TurnEvent:
    name: str
    data: MessageCreated | MessageDelta | ChatResponse | TurnError


@dataclass(eq=False)
class Turn:
    begun: service.BegunTurn
    model_used: str
    log: list[TurnEvent] = field(default_factory=list)
    error: AppError | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return bool(self.log) and self.log[-1].name in TERMINAL

    def publish(self, event: TurnEvent) -> None:
        self.log.append(event)
        # Wake every waiting reader; each clears nothing, it re-checks the log length.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_beyond(self, index: int) -> None:
        """Wait until the log has an event at `index`."""
        while index >= len(self.log):
            await self._changed.wait()

    async def outcome(self) -> TurnEvent:
        """Wait for the terminal event."""
        while not self.done:
            await self.wait_beyond(len(self.log))
        return self.log[-1]


class TurnManager:
    """Starts turns and keeps their tasks alive. Created and drained in the app's lifespan."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        provider: Provider,
        settings: Settings,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._provider = provider
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self, conversation_id: uuid.UUID, text: str) -> Turn:
        limit = self._settings.limits.max_message_chars
        if len(text) > limit:
            raise MessageTooLong(f"The message is over the limit of {limit} characters.")
        provider = self._provider
        budget = service.TokenBudget(
            context_window=provider.context_window,
            reply_tokens=min(self._settings.llm.max_tokens, provider.context_window // 2),
            per_message=provider.message_overhead(),
            count=provider.count_tokens,
        )
        text_tokens = provider.count_tokens(text)
        async with self._sessionmaker.begin() as session:
            begun = await service.begin_turn(
                session,
                conversation_id=conversation_id,
                text=text,
                text_tokens=text_tokens,
                budget=budget,
                default_system_prompt=self._settings.default_system_prompt,
                model_used=provider.model,
                lease=timedelta(seconds=self._settings.limits.busy_lease_seconds),
            )
        turn = Turn(begun=begun, model_used=provider.model)
        turn.publish(
            TurnEvent(
                CREATED,
                MessageCreated(**_ids(begun), model_used=provider.model),
            )
        )
        task = asyncio.create_task(
            self._run(turn, budget.reply_tokens), name=f"turn-{begun.assistant_message_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return turn

    async def _run(self, turn: Turn, reply_tokens: int) -> None:
        provider = self._provider
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        error: ProviderError | None = None
        options = GenerationOptions(
            max_tokens=reply_tokens, temperature=self._settings.llm.temperature
        )
        try:
            async for event in provider.stream(turn.begun.context, options):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    turn.publish(TurnEvent(DELTA, MessageDelta(delta=event.text)))
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Finish):
                    finish = event.reason
                elif isinstance(event, Routed):
                    turn.model_used = event.model
        except ProviderError as exc:
            error = exc
        except asyncio.CancelledError:
            # Shutdown cut this turn short: keep what was generated, then stop.
            error = ProviderUnavailable("the server shut down before the reply was finished")
            await asyncio.shield(self._finish(turn, parts, usage, finish, error))
            raise
        except Exception as exc:  # a bug in a provider: never leave the row `streaming`
            logger.exception("provider %s raised an unexpected error", provider.name)
            error = ProviderError(f"provider failed: {type(exc).__name__}")
        if usage is not None:
            provider.observe_usage(turn.begun.prompt_tokens, usage)
        await self._finish(turn, parts, usage, finish, error)

    async def _finish(
        self,
        turn: Turn,
        parts: list[str],
        usage: Usage | None,
        finish: str | None,
        error: ProviderError | None,
    ) -> None:
        text = "".join(parts)
        if error is None and finish is not None:
            status = MessageStatus.COMPLETED
        elif text:
            status = MessageStatus.INCOMPLETE
        else:
            status = MessageStatus.FAILED
        app_error: AppError | None = None
        if status is not MessageStatus.COMPLETED:
            app_error = UpstreamError.from_provider(
                error
                or ProviderUnavailable("the upstream stream ended before the reply was finished")
            )
        stored_error = _stored_error(app_error)
        token_count = usage.completion_tokens if usage else self._provider.count_tokens(text)
        if await self._persist(turn, text, status, token_count, usage, finish, stored_error):
            turn.publish(self._terminal(turn, text, status, usage, finish, app_error))
            return
        # The reply could not be stored: say so rather than report a success we cannot keep.
        lost = ReplyNotStored("The reply could not be stored; the database is unavailable.")
        turn.publish(self._terminal(turn, text, MessageStatus.FAILED, usage, finish, lost))

    async def _persist(
        self,
        turn: Turn,
        text: str,
        status: MessageStatus,
        token_count: int,
        usage: Usage | None,
        finish: str | None,
        error: dict[str, Any] | None,
    ) -> bool:
        for attempt in range(PERSIST_ATTEMPTS):
            try:
                async with self._sessionmaker.begin() as session:
                    await service.finish_turn(
                        session,
                        turn=turn.begun,
                        content=text,
                        status=status,
                        token_count=token_count,
                        usage=usage,
                        finish_reason=finish,
                        error=error,
                        model_used=turn.model_used,
                    )
                return True
            except Exception as exc:
                if not is_transient_db_error(exc) or attempt == PERSIST_ATTEMPTS - 1:
                    logger.error(
                        "could not store reply %s: %s",
                        turn.begun.assistant_message_id,
                        type(exc).__name__,
                    )
                    return False
                await asyncio.sleep(PERSIST_BACKOFF * 2**attempt)
        return False  # pragma: no cover - the loop always returns

    def _terminal(
        self,
        turn: Turn,
        text: str,
        status: MessageStatus,
        usage: Usage | None,
        finish: str | None,
        error: AppError | None,
    ) -> TurnEvent:
        usage_out = (
            None
            if usage is None
            else UsageOut(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            )
        )
        turn.error = error
        if error is None:
            return TurnEvent(
                COMPLETED,
                ChatResponse(
                    **_ids(turn.begun),
                    response=text,
                    model_used=turn.model_used,
                    status=status,
                    finish_reason=finish,
                    usage=usage_out,
                ),
            )
        return TurnEvent(
            INCOMPLETE if status is MessageStatus.INCOMPLETE else FAILED,
            TurnError(
                **_ids(turn.begun),
                error=_stored_error(error) or {},
                status=status,
                partial_response=text,
                model_used=turn.model_used,
            ),
        )

    async def drain(self, grace: float) -> None:
        """Let running turns finish for up to `grace` seconds, then cut the rest short; a cut
        turn stores its partial reply as `incomplete` before its task ends."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _ids(begun: service.BegunTurn) -> dict[str, uuid.UUID]:
    return {
        "conversation_id": begun.conversation_id,
        "user_message_id": begun.user_message_id,
        "assistant_message_id": begun.assistant_message_id,
    }


def _stored_error(error: AppError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"code": error.code, "message": error.message, "status": error.status_code}
