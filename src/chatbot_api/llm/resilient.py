"""Retries, a fallback chain and a circuit breaker around providers: `ResilientProvider`.

    provider = ResilientProvider([primary, *fallbacks], policy=RetryPolicy(), cooldown=30.0)

A reply walks the chain in order. Each member has a `CircuitBreaker`: while it is open the
member is skipped without being called. A call that fails with a `retryable` error is retried on
the same member, as `RetryPolicy` says. A member that still fails, or fails with an error that is
not retryable, hands over to the next member.

The commit point is the first event a member yields. For a plain provider that is its first
`TextDelta`, or the end of an empty reply. Until then nothing has reached the caller, so
retrying and falling back are safe. After it the wrapper only passes events through: no retry
and no fallback, because a second model would restart or duplicate text the client already has.
The error propagates instead. The events are one `Routed(provider, model, attempts, fallbacks)`,
then the answering member's events unchanged. `attempts` counts the upstream calls made for
this reply across the chain. `fallbacks` is the answering member's index: every member before
it was skipped or failed.

When the chain runs out, the error of the last call is raised. A `Retry-After` too long to
wait for therefore surfaces as that `ProviderRateLimited`, with `retry_after` intact, for the
API to pass on. If no call could be made at all because every breaker is open, the error is
`ProviderUnavailable`, raised at once.

Breaker verdicts: the first event is a success. A `ProviderRequestRejected` is a success too,
because the upstream answered and the request was at fault. Every other `ProviderError` is a
failure, mid-stream ones included. A half-open trial whose caller goes away before any verdict
frees the trial slot.

Capabilities are conservative, because the context is built before anyone knows which member
will answer. `name` and `model` are the primary's: logs and metrics keep the configured name,
and `Routed` says who actually answered. `context_window` is the chain's minimum.
`count_tokens` and `message_overhead` are its maximum. `supports_streaming` holds only if it
holds for every member.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Literal

from chatbot_api.llm import errors
from chatbot_api.llm.base import (
    ChatMessage,
    GenerationOptions,
    Provider,
    Routed,
    StreamEvent,
    Usage,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Random = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to call the same provider again, and how long to wait first.

    The defaults are the OpenAI and Groq SDKs' policy: 2 retries, with full-jitter exponential
    backoff from 0.5 s, capped at 8 s. A `Retry-After` is honoured exactly, up to
    `max_retry_after`. A longer one is not worth keeping an interactive chat waiting, so the
    provider is given up at once.
    """

    max_retries: int = 2
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 10.0

    def backoff(self, retry: int, random: Random) -> float:
        """Full jitter: uniform in [0, min(base_delay * 2**retry, max_delay)), `retry` from 0."""
        return random() * min(self.base_delay * 2.0**retry, self.max_delay)

    def delay(self, error: errors.ProviderError, retry: int, random: Random) -> float | None:
        """Seconds to wait before retry number `retry` (from 0) after `error`. None means give
        up on this provider: the error is not retryable, the retries are spent, or the
        upstream asked for a longer wait than `max_retry_after`."""
        if not error.retryable or retry >= self.max_retries:
            return None
        if isinstance(error, errors.ProviderRateLimited) and error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after else None
        return self.backoff(retry, random)


DEFAULT_POLICY = RetryPolicy()


class CircuitBreaker:
    """Guards one provider. It is closed until `failure_threshold` consecutive failures, then
    open for `cooldown` seconds. After that it is half-open: `allow()` lets exactly one trial
    call through. The trial's success closes the breaker; its failure opens it again for
    another cooldown."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_trial", "cooldown", "failure_threshold")

    def __init__(
        self, failure_threshold: int = 5, cooldown: float = 30.0, *, clock: Clock = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() >= self._opened_at + self.cooldown:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go now. When half-open this is True once, for the trial. The trial
        is then in flight until `success()`, `failure()` or `release()`."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock() < self._opened_at + self.cooldown:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        self._failures += 1
        # A straggler that was let through before the breaker opened must not extend the cooldown.
        if self._trial or (self._opened_at is None and self._failures >= self.failure_threshold):
            self._opened_at = self._clock()
        self._trial = False

    def release(self) -> None:
        """The trial ended without a verdict (its caller went away): let another one through."""
        self._trial = False


class ResilientProvider:
    """A `Provider` over `[primary, *fallbacks]`. It starts and closes every member."""

    def __init__(
        self,
        chain: Sequence[Provider],
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        failure_threshold: int = 5,
        cooldown: float = 30.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        random: Random = _random.random,
    ) -> None:
        if not chain:
            raise ValueError("a ResilientProvider needs at least one provider")
        self.chain = tuple(chain)
        self.breakers = tuple(
            CircuitBreaker(failure_threshold, cooldown, clock=clock) for _ in self.chain
        )
        self.policy = policy
        self._sleep = sleep
        self._random = random
        # Last member that answered, for `observe_usage`. This is shared by concurrent replies,
        # so under a mix of answerers a sample can go to the wrong member: the EWMA damps it.
        self._answered: Provider = self.chain[0]

    def __repr__(self) -> str:
        return f"ResilientProvider({[p.name for p in self.chain]!r})"

    @property
    def name(self) -> str:
        return self.chain[0].name

    @property
    def model(self) -> str:
        return self.chain[0].model

    @property
    def context_window(self) -> int:
        return min(p.context_window for p in self.chain)

    @property
    def supports_streaming(self) -> bool:
        return all(p.supports_streaming for p in self.chain)

    def count_tokens(self, text: str) -> int:
        return max(p.count_tokens(text) for p in self.chain)

    def message_overhead(self) -> int:
        return max(p.message_overhead() for p in self.chain)

    def max_tokens_per_byte(self) -> float:
        return max(p.max_tokens_per_byte() for p in self.chain)

    def observe_usage(self, estimated_prompt_tokens: int, usage: Usage) -> None:
        self._answered.observe_usage(estimated_prompt_tokens, usage)

    async def start(self) -> None:
        async with AsyncExitStack() as started:
            for provider in self.chain:
                await provider.start()
                started.push_async_callback(provider.aclose)
            started.pop_all()  # all started: keep them. Otherwise the exit closes them again.

    def is_ready(self) -> bool:
        return any(p.is_ready() for p in self.chain)

    async def aclose(self) -> None:
        # The stack closes every member even if one of them raises, then re-raises.
        async with AsyncExitStack() as members:
            for provider in self.chain:
                members.push_async_callback(provider.aclose)

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        attempts = 0
        error: errors.ProviderError | None = None
        for index, (provider, breaker) in enumerate(zip(self.chain, self.breakers, strict=True)):
            # A model the caller chose names the primary's model; fallbacks use their own.
            member_options = options if index == 0 else replace(options, model=None)
            model = member_options.model or provider.model
            retry = 0
            while breaker.allow():
                trial = breaker.state == "half_open"  # let through an open breaker: the trial
                attempts += 1
                inner = provider.stream(messages, member_options)
                first: StreamEvent | None = None
                try:
                    first = await anext(inner)
                except StopAsyncIteration:
                    pass  # an empty reply is still an answer
                except errors.ProviderError as exc:
                    _judge(breaker, exc)
                    error = exc
                    delay = self.policy.delay(exc, retry, self._random)
                    if delay is None or breaker.state != "closed":
                        logger.warning("giving up on provider %s: %s", provider.name, exc.message)
                        break
                    retry += 1
                    await self._sleep(delay)
                    continue
                except BaseException:
                    if trial:
                        breaker.release()
                    await _close(inner)
                    raise
                # Committed: from here on, events pass straight through, and nothing is
                # retried, so the prompt is not needed again while the reply streams.
                breaker.success()
                del messages
                self._answered = provider
                try:
                    yield Routed(provider.name, model, attempts, index)
                    if first is None:
                        return
                    yield first
                    async for event in inner:
                        yield event
                except errors.ProviderError as exc:
                    _judge(breaker, exc)
                    raise
                finally:
                    # Closing our stream early (aclose, cancellation) closes the member's stream,
                    # which drops the upstream connection so that generation stops.
                    await _close(inner)
                return
        if error is None:
            raise errors.ProviderUnavailable(
                "all providers are cooling down after repeated failures; try again shortly"
            )
        raise error


def _judge(breaker: CircuitBreaker, error: errors.ProviderError) -> None:
    if isinstance(error, errors.ProviderRequestRejected):
        breaker.success()  # the upstream is up; the request was at fault
    else:
        breaker.failure()


async def _close(stream: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(stream, "aclose", None)  # the protocol promises an iterator, not a generator
    if aclose is not None:
        await aclose()
