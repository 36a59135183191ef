"""The limiter interface. Three primitives cover every limit the API enforces:

    hit(key, limit, window)        a rate: "`limit` events per `window` seconds", as a
                                   bucket of `limit` events refilled evenly over `window`
                                   (`bucket`); the event counts only if allowed
    peek(key, limit, window)       the same decision without counting anything
    acquire / release(key, token)  at most `limit` leases held at once; a lease expires by
                                   itself, so a process that dies cannot leak a slot
    add / total(key)               a counter that expires (tokens spent per UTC day)

Implementations: `MemoryLimiter` (one process) and `RedisLimiter` (several processes share
one Redis; every decision is one atomic Lua script, timed by the Redis clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check. `retry_after` is how long until one more event would be
    allowed (0 when one is allowed now); `reset_after` is how long until the limit is back
    to its initial state (a full bucket, no lease or event counted), the
    `x-ratelimit-reset-*` of OpenAI and Groq."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float


class Limiter(Protocol):
    """Created and closed in the app's lifespan; shared by every request of the process."""

    async def hit(self, key: str, *, limit: int, window: float) -> Decision: ...

    async def peek(self, key: str, *, limit: int, window: float) -> Decision: ...

    async def acquire(self, key: str, token: str, *, limit: int, lease: float) -> Decision: ...

    async def release(self, key: str, token: str) -> None: ...

    async def add(self, key: str, amount: int, *, ttl: float) -> int: ...

    async def total(self, key: str) -> int: ...

    async def aclose(self) -> None: ...


# Rounding slack, in seconds, when the last event of a burst is compared with the window: the
# bucket's times are sums of a clock reading and `window / limit`, which rounds.
SLACK = 1e-6


def bucket(
    tat: float | None, now: float, *, limit: int, window: float, count: bool
) -> tuple[Decision, float]:
    """One decision of the rate "`limit` events per `window` seconds": a bucket that holds
    `limit` events (a burst of `limit` is allowed at once) and refills evenly, one event every
    `window / limit` seconds. This is GCRA: the whole state of a key is one number, `tat`, the
    moment its bucket is full again (None, or a moment passed, for a full bucket).

    A sliding-window log would keep a timestamp per event, `limit` numbers per key: at a high
    limit, megabytes per key, allocated a little more on every request.

    Returns the decision for one more event at `now` and the `tat` to store if it is
    `count`ed (unchanged when it is refused or only peeked at). `remaining` is how many more
    events would be allowed now, `retry_after` how long until one more would be (0 while
    `remaining` is not), `reset_after` how long until the bucket is full."""
    interval = window / limit
    start = now if tat is None or tat < now else tat
    allowed = start + interval - now <= window + SLACK
    end = start + interval if allowed and count else start
    debt = end - now
    remaining = max(0, min(limit, math.floor((window + SLACK - debt) / interval)))
    retry_after = 0.0 if remaining else max(0.0, end + interval - window - now)
    return Decision(allowed, limit, remaining, retry_after, debt), end
