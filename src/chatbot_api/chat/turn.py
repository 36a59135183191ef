"""A turn as its readers see it: an append-only log of events that any number of readers
follow from any position (`chat.events`), fed either by the task generating the reply in
this process (`chat.turns`), by the stored row of a finished reply, or, for a reply being
generated in another process, by polling that row (`follow`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot_api.chat import service
from chatbot_api.chat.outcomes import (
    DELTA,
    TERMINAL,
    TurnEvent,
    TurnIds,
    error_from_stored,
    stored_error,
    terminal_event,
)
from chatbot_api.chat.schemas import MessageDelta
from chatbot_api.conversations.models import Message, MessageStatus
from chatbot_api.errors import AppError, GenerationInterrupted

# How often a follower polls the row of a turn running in another process.
FOLLOW_INTERVAL = 0.2


@dataclass(eq=False)
class Turn:
    ids: TurnIds
    model_used: str
    begun: service.BegunTurn | None = None
    log: list[TurnEvent] = field(default_factory=list)
    text_length: int = 0
    error: AppError | None = None
    attempts: int = 1
    fallbacks: int = 0
    cancel_requested: bool = False
    # Set once the reply is being stored: from then on nothing may interrupt the task.
    finishing: bool = False
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return bool(self.log) and self.log[-1].name in TERMINAL

    def publish(self, event: TurnEvent) -> None:
        self.log.append(event)
        # Wake every waiting reader; each re-checks the log length.
        self._changed.set()
        self._changed = asyncio.Event()

    def publish_delta(self, text: str) -> None:
        self.text_length += len(text)
        self.publish(TurnEvent(DELTA, MessageDelta(delta=text), self.text_length))

    async def wait_beyond(self, index: int) -> None:
        """Wait until the log has an event at `index`."""
        while index >= len(self.log):
            await self._changed.wait()

    async def outcome(self) -> TurnEvent:
        """Wait for the terminal event."""
        while not self.done:
            await self.wait_beyond(len(self.log))
        return self.log[-1]

    def publish_stored(self, message: Message) -> None:
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


async def follow(
    turn: Turn, sessionmaker: async_sessionmaker[AsyncSession], *, deadline: float
) -> None:
    """Mirror a turn running in another process by polling its row until it ends (or for
    `deadline` seconds, after which the reply is reported interrupted)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    while loop.time() < give_up:
        await asyncio.sleep(FOLLOW_INTERVAL)
        async with sessionmaker() as session:
            message = await session.get(Message, turn.ids.assistant_message_id)
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
