"""The in-process limiter: exact, and shared by every request of one process only.

Everything runs on the event loop with no `await` inside a decision, so no lock is needed.
A rate limit is one number per key (`limits.base.bucket`), whatever the limit or the rate.
Keys that fall idle are swept every `SWEEP_EVERY` operations, so memory stays bounded by the
keys active in the last window (a failed-auth key per client address, for instance).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chatbot_api.limits.base import Decision, bucket

SWEEP_EVERY = 1024


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key -> the moment its bucket is full again (`base.bucket`).
        self._buckets: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._ops = 0

    def _rate(self, key: str, limit: int, window: float, *, count: bool) -> Decision:
        now = self._tick()
        decision, tat = bucket(self._buckets.get(key), now, limit=limit, window=window, count=count)
        if count and decision.allowed:
            self._buckets[key] = tat
        return decision

    async def hit(self, key: str, *, limit: int, window: float) -> Decision:
        return self._rate(key, limit, window, count=True)

    async def peek(self, key: str, *, limit: int, window: float) -> Decision:
        return self._rate(key, limit, window, count=False)

    async def acquire(self, key: str, token: str, *, limit: int, lease: float) -> Decision:
        now = self._tick()
        leases = self._leases.setdefault(key, {})
        if len(leases) >= limit:
            # Expired leases are looked for only when they could make room: with many turns
            # in flight, a scan on every acquire would cost more than the turn's own work.
            for expired in [t for t, exp in leases.items() if exp <= now]:
                del leases[expired]
        allowed = len(leases) < limit
        if allowed:
            leases[token] = now + lease
        remaining = max(0, limit - len(leases))
        retry_after = 0.0 if remaining else max(0.0, min(leases.values()) - now)
        return Decision(allowed, limit, remaining, retry_after, retry_after)

    async def release(self, key: str, token: str) -> None:
        self._leases.get(key, {}).pop(token, None)

    async def add(self, key: str, amount: int, *, ttl: float) -> int:
        now = self._tick()
        value, expires = self._counters.get(key, (0, now + ttl))
        if expires <= now:
            value, expires = 0, now + ttl
        self._counters[key] = (value + amount, expires)
        return value + amount

    async def total(self, key: str) -> int:
        now = self._tick()
        value, expires = self._counters.get(key, (0, now))
        return value if expires > now else 0

    async def aclose(self) -> None:
        self._buckets.clear()
        self._leases.clear()
        self._counters.clear()

    def _tick(self) -> float:
        now = self._clock()
        self._ops += 1
        if self._ops % SWEEP_EVERY == 0:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        # A bucket whose arrival time has passed is full again: the same as no entry.
        self._buckets = {k: tat for k, tat in self._buckets.items() if tat > now}
        self._leases = {
            k: live
            for k, leases in self._leases.items()
            if (live := {t: exp for t, exp in leases.items() if exp > now})
        }
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
