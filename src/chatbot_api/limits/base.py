"""The limiter interface. Three primitives cover every limit the API enforces:

    hit(key, limit, window)        sliding-window log: "at most `limit` events in any
                                   `window` seconds"; the event counts only if allowed
    peek(key, limit, window)       the same decision without counting anything
    acquire / release(key, token)  at most `limit` leases held at once; a lease expires by
                                   itself, so a process that dies cannot leak a slot
    add / total(key)               a counter that expires (tokens spent per UTC day)

Implementations: `MemoryLimiter` (one process) and `RedisLimiter` (several processes share
one Redis; every decision is one atomic Lua script, timed by the Redis clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check. `retry_after` is how long until one more event would be
    allowed (0 when one is allowed now); `reset_after` is how long until the window holds
    no events at all, the `x-ratelimit-reset-*` of OpenAI and Groq."""

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
