"""A turn as its readers see it: an append-only log of events that any number of readers
follow from any position (`chat.events`), fed either by the task generating the reply in
this process (`chat.turns`), by the stored row of a finished reply, or, for a reply being
generated in another process, by polling that row (`follow`).

Publishing is on the per-token path, so it is cheap: an append, and a wake-up only for the
readers that are actually waiting (a non-streaming request waits for the end alone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.chat import service
from chatbot_api.chat.outcomes import (
    TERMINAL,
    LogEntry,
    TurnEvent,
    TurnIds,
    error_from_stored,
    stored_error,
    terminal_event,
)
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.errors import AppError, GenerationInterrupted
from chatbot_api.llm.base import ChatMessage, Usage
from chatbot_api.sql import run_transaction

logger = logging.getLogger(__name__)

# How often a follower polls the row of a turn running in another process.
FOLLOW_INTERVAL = 0.2


@dataclass(eq=False)
class Turn:
    ids: TurnIds
    model_used: str
    begun: service.BegunTurn | None = None
    # Events and deltas (`LogEntry`), appended in order and never changed: readers hold an
    # index into it.
    log: list[LogEntry] = field(default_factory=list)
    text_length: int = 0
    # How much of the text the last checkpoint stored (`chat.turns`).
    stored_length: int = 0
    error: AppError | None = None
    attempts: int = 1
    fallbacks: int = 0
    cancel_requested: bool = False
    # Set once the reply is being stored: from then on nothing may interrupt the task.
    finishing: bool = False
    task: asyncio.Task[None] | None = None
    # What the provider reported, handed once to whoever counts it (`take_usage`).
    usage: Usage | None = None
    _usage_taken: bool = False
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # One future per reader of the outcome: cancelling one reader cancels only its own.
    _outcome_waiters: list[asyncio.Future[TurnEvent]] = field(default_factory=list)
    _done_callbacks: list[Callable[[], None]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.final is not None

    @property
    def final(self) -> TurnEvent | None:
        """The terminal event, once published."""
        last = self.log[-1] if self.log else None
        return last if isinstance(last, TurnEvent) and last.name in TERMINAL else None

    def _append(self, entry: LogEntry) -> None:
        self.log.append(entry)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def publish(self, event: TurnEvent) -> None:
        self._append(event)
        if event.name in TERMINAL:
            for reader in self._outcome_waiters:
                if not reader.done():
                    reader.set_result(event)
            self._outcome_waiters.clear()
            callbacks, self._done_callbacks = self._done_callbacks, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one hook's bug must not keep the others from running
                    logger.exception("a turn's done callback failed")

    def publish_delta(self, text: str) -> None:
        self.text_length += len(text)
        self._append(text)

    def take_context(self) -> list[ChatMessage]:
        """The prompt, handed over once, to the provider: the turn keeps no reference to it
        while the reply streams (it can be a whole context window of history)."""
        assert self.begun is not None
        context = self.begun.context
        self.begun = dataclasses.replace(self.begun, context=[])
        return context

    def text(self) -> str:
        """The reply so far: the deltas of the log."""
        return "".join(e for e in self.log if isinstance(e, str))

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved at the next publish. The caller may resolve it itself (a
        keep-alive timer does), which is harmless."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def outcome(self) -> TurnEvent:
        """Wait for the terminal event."""
        if (final := self.final) is not None:
            return final
        waiter: asyncio.Future[TurnEvent] = asyncio.get_running_loop().create_future()
        self._outcome_waiters.append(waiter)
        return await waiter

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the terminal event is published (now, if it already is)."""
        if self.done:
            callback()
        else:
            self._done_callbacks.append(callback)

    def take_usage(self) -> Usage | None:
        """The usage of a reply generated by this process, the first time only: a replay or a
        second reader of the same turn must not count it again."""
        if self._usage_taken or self.begun is None:
            return None
        self._usage_taken = True
        return self.usage

    def publish_stored(self, message: service.StoredReply) -> None:
        """Publish what a finished row holds: the rest of its text, then its terminal event."""
        if len(message.content) > self.text_length:
            self.publish_delta(message.content[self.text_length :])
        if message.status != MessageStatus.COMPLETED:
            self.error = error_from_stored(message.error)
        self.publish(
            terminal_event(
                self.ids,
                text=message.content,
                status=MessageStatus(message.status),
                model_used=message.model_used or "",
                finish_reason=message.finish_reason,
                usage=message.usage,
                error=message.error,
            )
        )


async def follow(turn: Turn, engine: AsyncEngine, *, deadline: float) -> None:
    """Mirror a turn running in another process by polling its row until it ends (or for
    `deadline` seconds, after which the reply is reported interrupted)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    while loop.time() < give_up:
        await asyncio.sleep(FOLLOW_INTERVAL)
        message = await run_transaction(
            engine, lambda tx: service.load_stored_reply(tx, turn.ids.assistant_message_id)
        )
        if message is None:
            break
        if message.status != MessageStatus.STREAMING:
            turn.publish_stored(message)
            return
        if len(message.content) > turn.text_length:
            turn.publish_delta(message.content[turn.text_length :])
    lost = GenerationInterrupted("The reply is no longer being generated.")
    turn.error = lost
    turn.publish(
        terminal_event(
            turn.ids,
            text="",
            status=MessageStatus.INCOMPLETE,
            model_used=turn.model_used,
            finish_reason=None,
            usage=None,
            error=stored_error(lost),
        )
    )
