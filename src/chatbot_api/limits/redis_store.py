"""The Redis limiter: one limit shared by every process that talks to the same Redis.

Every decision is a single Lua script, so it is atomic however many processes ask at once,
and it reads the time from Redis (`TIME`), so the processes' clocks never need to agree.
A rate is one number per key, the moment its bucket is full again (`base.bucket`); leases
are a sorted set of tokens scored by their expiry; counters are plain integers with a TTL.
Every key expires by itself once it no longer holds anything.

A Redis that cannot be reached is a 503 (`LimiterUnavailable`), never an unmetered request.
"""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatbot_api.errors import LimiterUnavailable
from chatbot_api.limits.base import SLACK, Decision

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS[1] bucket; ARGV: limit, window (us), "1" to count the event or "0" to peek, slack (us).
# The arithmetic of `base.bucket`, in microseconds: the value is the moment the bucket is full.
# Times count from 2023-11-14 (epoch second 1.7e9), not 1970: a double then keeps them to a
# few nanoseconds, where microseconds since 1970 round to a quarter of one.
_HIT = """
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local key, limit, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local slack = tonumber(ARGV[4])
local interval = window / limit
local start = now
local stored = redis.call('GET', key)
if stored then start = math.max(tonumber(stored), now) end
local allowed, finish = 0, start
if start + interval - now <= window + slack then
  allowed = 1
  if ARGV[3] == '1' then
    finish = start + interval
    local ttl = math.ceil((finish - now) / 1000) + 1
    redis.call('SET', key, string.format('%.17g', finish), 'PX', ttl)
  end
end
local debt = finish - now
local remaining = math.max(0, math.min(limit, math.floor((window + slack - debt) / interval)))
local retry = 0
if remaining == 0 then retry = math.max(0, finish + interval - window - now) end
return {allowed, remaining, retry, debt}
"""

# KEYS[1] leases; ARGV: limit, lease (us), token.
_ACQUIRE = (
    _NOW
    + """
local key, limit, lease = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local count = redis.call('ZCARD', key)
local allowed = 0
if count < limit then
  redis.call('ZADD', key, now + lease, ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(lease / 1000))
  count = count + 1
  allowed = 1
end
local retry = 0
if count >= limit and count > 0 then
  retry = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) - now
end
return {allowed, count, retry}
"""
)

# KEYS[1] counter; ARGV: amount, ttl (ms). The TTL is set once, when the counter is created.
_ADD = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 2.0


def _us(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1_000_000))


class RedisLimiter:
    def __init__(self, url: str, *, prefix: str = "chatbot:limits:") -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT
        )
        self._prefix = prefix
        self._hit = self._redis.register_script(_HIT)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._add = self._redis.register_script(_ADD)

    async def _run(self, call: Any) -> Any:
        try:
            return await call
        except RedisError as exc:
            raise LimiterUnavailable(
                f"The rate limiter is unavailable ({type(exc).__name__}); retry shortly."
            ) from None

    async def _rate(self, key: str, *, limit: int, window: float, count: bool) -> Decision:
        args: list[str | int] = [limit, _us(window), "1" if count else "0", _us(SLACK)]
        # A key of its own kind: a sorted set left by an earlier version under the same name
        # would make GET fail until it expired.
        allowed, remaining, retry, reset = await self._run(
            self._hit(keys=[f"{self._prefix}bucket:{key}"], args=args)
        )
        return Decision(
            allowed=bool(allowed),
            limit=limit,
            remaining=max(0, int(remaining)),
            retry_after=max(0, int(retry)) / 1_000_000,
            reset_after=max(0, int(reset)) / 1_000_000,
        )

    async def hit(self, key: str, *, limit: int, window: float) -> Decision:
        return await self._rate(key, limit=limit, window=window, count=True)

    async def peek(self, key: str, *, limit: int, window: float) -> Decision:
        return await self._rate(key, limit=limit, window=window, count=False)

    async def acquire(self, key: str, token: str, *, limit: int, lease: float) -> Decision:
        allowed, used, retry = await self._run(
            self._acquire(keys=[self._prefix + key], args=[limit, _us(lease), token])
        )
        retry_after = max(0, int(retry)) / 1_000_000
        return Decision(bool(allowed), limit, max(0, limit - int(used)), retry_after, retry_after)

    async def release(self, key: str, token: str) -> None:
        await self._run(self._redis.zrem(self._prefix + key, token))

    async def add(self, key: str, amount: int, *, ttl: float) -> int:
        ttl_ms = max(1, math.ceil(ttl * 1000))
        value = await self._run(self._add(keys=[self._prefix + key], args=[amount, ttl_ms]))
        return int(value)

    async def total(self, key: str) -> int:
        value = await self._run(self._redis.get(self._prefix + key))
        return int(value) if value is not None else 0

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()
