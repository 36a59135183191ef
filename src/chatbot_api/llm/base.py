"""Messages, stream events, usage and the `Provider` protocol.

Every provider exposes one primitive, `stream(messages, options)`, an async iterator of
`StreamEvent`s. A well-formed stream is an optional `Routed`, zero or more
`TextDelta`s, at most one `Usage`, and exactly one `Finish` as the last event. A stream that
stops without a `Finish` was cut short: the caller stores what it got as `incomplete`.
Failures are raised as `ProviderError`s (see `llm.errors`), never as foreign exceptions.

`complete()` is the non-streaming call: a helper over `stream()`, so both paths share one
code path in every provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Our own deadlines for one provider call, in seconds. `idle` is the longest gap between
    two pieces of text: keep-alive comments do not reset it."""

    connect: float = 10.0
    first_token: float = 60.0
    idle: float = 30.0
    total: float = 300.0


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    max_tokens: int = 1024
    temperature: float | None = None
    # Another model of the same provider, from the server's allowlist; None: the default one.
    model: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The provider said the reply is over: "stop", "length", "content_filter", ..."""

    reason: str


@dataclass(frozen=True, slots=True)
class Routed:
    """Which model is answering, emitted by routing wrappers (retries, fallbacks) before the
    first `TextDelta`. `attempts` counts upstream calls made for this reply, `fallbacks` how
    many providers of the chain were skipped. Plain providers do not emit it."""

    provider: str
    model: str
    attempts: int = 1
    fallbacks: int = 0


StreamEvent = TextDelta | Usage | Finish | Routed


@runtime_checkable
class Provider(Protocol):
    """A chat model. Instances are created once, in the app's lifespan, and closed there."""

    @property
    def name(self) -> str:
        """Short provider name for logs and metrics: "groq", "openai", "local"."""
        ...

    @property
    def model(self) -> str:
        """The model id sent upstream and reported to clients as `model_used`."""
        ...

    @property
    def context_window(self) -> int:
        """Total tokens (prompt + reply) the model accepts."""
        ...

    @property
    def supports_streaming(self) -> bool: ...

    def count_tokens(self, text: str) -> int:
        """Tokens that `text` costs as message content. Exact where the model's tokenizer is
        available offline, otherwise a conservative (over-)estimate."""
        ...

    def message_overhead(self) -> int:
        """Extra tokens the chat template adds per message (role markers, separators)."""
        ...

    def max_tokens_per_byte(self) -> float:
        """A bound `k` with `count_tokens(text) <= k * len(text.encode()) + 1` for any text,
        now and after any calibration: whether a stored text fits a budget can then be told
        from its size alone, in SQL (`chat.service.begin_turn`)."""
        ...

    def observe_usage(self, estimated_prompt_tokens: int, usage: Usage) -> None:
        """Feed back what the provider reported, to calibrate `count_tokens`."""
        ...

    def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncIterator[StreamEvent]:
        """Generate a reply. Closing the iterator early cancels the generation upstream."""
        ...

    async def start(self) -> None:
        """Open clients or load weights. Called once, from the app's lifespan."""
        ...

    def is_ready(self) -> bool:
        """Configured and able to take requests (for the readiness probe)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None


async def complete(
    provider: Provider, messages: list[ChatMessage], options: GenerationOptions
) -> Completion:
    """Run `provider.stream()` to the end and gather the reply."""
    parts: list[str] = []
    usage: Usage | None = None
    finish: str | None = None
    async for event in provider.stream(messages, options):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, Finish):
            finish = event.reason
    return Completion(text="".join(parts), finish_reason=finish, usage=usage)
