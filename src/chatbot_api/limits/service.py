"""The limits each key is held to, and the checks that enforce them.

    requests per minute     every authenticated request: a burst of the limit, then the
                            limit's rate (`base.bucket`), exact
    concurrent streams      generations in flight at once, streamed or not: a slot is taken
                            before the turn starts and given back when its reply is stored,
                            not when the client leaves, because the generation still runs
    tokens per day          prompt + completion as the provider reports them, per UTC day;
                            checked before a turn starts, counted once when its reply is stored
    failed authentications  per client address, far fewer than the request rate, and checked
                            before the key is: a client guessing keys is told nothing more

An exceeded limit is a `RateLimited` error (429) with `Retry-After` and the
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers that OpenAI and Groq send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from chatbot_api.errors import AppError, ModelNotAllowed, RateLimited
from chatbot_api.limits.base import Decision, Limiter

logger = logging.getLogger(__name__)

MINUTE = 60.0
DAY = 86_400.0

Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    requests_per_minute: int
    concurrent_streams: int
    tokens_per_day: int


def format_duration(seconds: float) -> str:
    """`6m0s`, `1.5s`, `20ms`: the reset format of OpenAI's and Groq's headers."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def ratelimit_headers(kind: Kind, decision: Decision) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(decision.limit),
        f"x-ratelimit-remaining-{kind}": str(decision.remaining),
        f"x-ratelimit-reset-{kind}": format_duration(decision.reset_after),
    }


def _exceeded(message: str, kind: Kind, decision: Decision, code: str = "rate_limited") -> AppError:
    return RateLimited(
        message,
        retry_after=decision.retry_after,
        headers=ratelimit_headers(kind, decision),
        code=code,
    )


async def admit_request(limiter: Limiter, *, subject: str, limits: KeyLimits) -> Decision:
    """Count one request against the key's per-minute limit, or raise `RateLimited`."""
    decision = await limiter.hit(f"rpm:{subject}", limit=limits.requests_per_minute, window=MINUTE)
    if not decision.allowed:
        raise _exceeded(
            f"Over the limit of {limits.requests_per_minute} requests per minute for this key.",
            "requests",
            decision,
        )
    return decision


async def check_auth_throttle(limiter: Limiter, *, client: str, limit: int) -> None:
    """Refuse a client that has sent too many bad keys lately, before its key is looked at."""
    decision = await limiter.peek(f"authfail:{client}", limit=limit, window=MINUTE)
    if not decision.allowed:
        raise RateLimited(
            "Too many requests with an invalid API key from this client; retry later.",
            retry_after=decision.retry_after,
            code="too_many_failed_attempts",
        )


async def record_auth_failure(limiter: Limiter, *, client: str, limit: int) -> None:
    await limiter.hit(f"authfail:{client}", limit=limit, window=MINUTE)


def resolve_generation(
    *,
    model: str | None,
    max_tokens: int | None,
    default_model: str,
    allowed_models: list[str],
    max_tokens_cap: int,
) -> tuple[str, int]:
    """The model and reply budget a turn may use: a model outside the allowlist is a 403
    (the default model is always allowed), and `max_tokens` is clamped to the server cap."""
    chosen = model or default_model
    if chosen != default_model and chosen not in allowed_models:
        raise ModelNotAllowed(
            f"The model {chosen[:100]!r} is not allowed on this server.",
            details=[{"allowed_models": sorted({default_model, *allowed_models})}],
        )
    return chosen, min(max_tokens or max_tokens_cap, max_tokens_cap)


class Outcome(Protocol):
    """What a started turn offers the guard: a callback once the reply is stored (at once if
    it already is), and the usage to count, which only the turn that generated the reply
    hands out, once (a replay or a second reader of the same turn gets None)."""

    def add_done_callback(self, callback: Callable[[], None]) -> None: ...

    def take_usage(self) -> Any: ...


T = TypeVar("T", bound=Outcome)


def _today(now: datetime) -> tuple[str, float]:
    """The UTC day's key suffix and the seconds until it ends."""
    left = DAY - (now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6)
    return f"{now.year:04d}{now.month:02d}{now.day:02d}", left


class Generations:
    """Guards the start of every turn (daily tokens, concurrent streams) and settles it when
    its reply is stored (usage counted, slot released). Created in the app's lifespan; its
    watcher tasks are drained there after the turns themselves."""

    def __init__(self, limiter: Limiter, *, stream_lease: float) -> None:
        self._limiter = limiter
        self._lease = stream_lease
        self._watchers: set[asyncio.Task[None]] = set()
        # Slot tokens: unique across processes (a random prefix), cheap within one (a count).
        self._tokens = map(f"{secrets.token_hex(8)}:{{}}".format, itertools.count())

    async def start(self, subject: str, limits: KeyLimits, begin: Callable[[], Awaitable[T]]) -> T:
        """Check the key's daily tokens, take a stream slot, then `begin()` the turn. The slot
        is released at once if the turn does not start (404, 409, 422...)."""
        day, until_midnight = _today(datetime.now(UTC))
        used = await self._limiter.total(f"tokens:{subject}:{day}")
        tokens = Decision(
            allowed=used < limits.tokens_per_day,
            limit=limits.tokens_per_day,
            remaining=max(0, limits.tokens_per_day - used),
            retry_after=until_midnight,
            reset_after=until_midnight,
        )
        if not tokens.allowed:
            raise _exceeded(
                f"This key has used its {limits.tokens_per_day} tokens for today (UTC).",
                "tokens",
                tokens,
                code="token_budget_exhausted",
            )
        token = next(self._tokens)
        slot = await self._limiter.acquire(
            f"streams:{subject}", token, limit=limits.concurrent_streams, lease=self._lease
        )
        if not slot.allowed:
            raise RateLimited(
                f"This key already has {limits.concurrent_streams} generations in flight.",
                retry_after=min(slot.retry_after, 5.0),
                code="too_many_streams",
            )
        try:
            turn = await begin()
        except BaseException:
            await self._limiter.release(f"streams:{subject}", token)
            raise
        # Settled when the reply is stored, by a task started then: no task waits per turn.
        turn.add_done_callback(lambda: self._spawn_settle(turn, subject, token))
        return turn

    def _spawn_settle(self, turn: Outcome, subject: str, token: str) -> None:
        watcher = asyncio.create_task(self._settle(turn, subject, token), name="limits-settle")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _settle(self, turn: Outcome, subject: str, token: str) -> None:
        try:
            usage = turn.take_usage()
            if usage is not None:
                day, until_midnight = _today(datetime.now(UTC))
                spent = int(usage.prompt_tokens) + int(usage.completion_tokens)
                await self._limiter.add(f"tokens:{subject}:{day}", spent, ttl=until_midnight + 3600)
        except Exception as exc:  # a limiter outage must not take the turn down with it
            logger.warning("could not settle the limits of a turn: %s", type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await self._limiter.release(f"streams:{subject}", token)

    async def settled(self) -> None:
        """Wait until every turn started so far has been settled (usage counted)."""
        while self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)

    async def drain(self, grace: float) -> None:
        if self._watchers:
            _, pending = await asyncio.wait(set(self._watchers), timeout=grace)
            for task in pending:
                task.cancel()


def create_limiter(backend: Literal["memory", "redis"], *, redis_url: str, prefix: str) -> Limiter:
    """The limiter for `LIMITS_BACKEND`; nothing connects until the first check."""
    if backend == "redis":
        from chatbot_api.limits.redis_store import RedisLimiter

        return RedisLimiter(redis_url, prefix=prefix)
    from chatbot_api.limits.memory import MemoryLimiter

    return MemoryLimiter()
