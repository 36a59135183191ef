"""The limiter primitives, the same on both backends: exact counts under concurrency, rates
that refill, leases that expire and counters with a TTL. Windows are short so the tests stay
fast; nothing asserts how long anything took."""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid

import pytest

from chatbot_api.errors import LimiterUnavailable
from chatbot_api.limits.base import Limiter
from chatbot_api.limits.memory import MemoryLimiter
from chatbot_api.limits.redis_store import RedisLimiter


class TestRate:
    async def test_allows_exactly_the_limit_then_refuses(self, limiter: Limiter) -> None:
        decisions = [await limiter.hit("k", limit=3, window=60) for _ in range(5)]

        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
        assert decisions[0].limit == 3
        assert decisions[0].retry_after == 0
        assert 0 < decisions[3].retry_after <= 60
        assert 0 < decisions[3].reset_after <= 60

    @pytest.mark.parametrize(("limit", "window"), [(7, 60), (1_000_000, 60), (3, 7.0)])
    async def test_limits_that_do_not_divide_evenly_are_exact(
        self, limiter: Limiter, limit: int, window: float
    ) -> None:
        # window / limit rounds, and so does the clock reading it is added to: the limit-th
        # event of a burst must still fit, and one hit must leave exactly limit - 1 (a slack
        # relative to the window, 1e-9, left 999,998 here in memory).
        first = await limiter.hit(f"odd-{limit}", limit=limit, window=window)
        burst = [await limiter.hit(f"odd-{limit}", limit=limit, window=window) for _ in range(6)]

        assert first.remaining == limit - 1
        if limit < 10:
            assert [d.allowed for d in burst] == [True] * (limit - 1) + [False] * (7 - limit)

    async def test_concurrent_hits_never_overshoot(self, limiter: Limiter) -> None:
        decisions = await asyncio.gather(
            *(limiter.hit("burst", limit=10, window=60) for _ in range(50))
        )

        assert sum(d.allowed for d in decisions) == 10

    async def test_keys_are_counted_apart(self, limiter: Limiter) -> None:
        await limiter.hit("a", limit=1, window=60)

        assert (await limiter.hit("b", limit=1, window=60)).allowed
        assert not (await limiter.hit("a", limit=1, window=60)).allowed

    async def test_a_spent_bucket_refills_one_event_per_interval(self, limiter: Limiter) -> None:
        # 2 per 2 s: one event back every second. A sliding-window log would still refuse at
        # 1.3 s, with both events inside the last 2 s. (Only a stall of 0.7 s between the
        # last two hits could let the second one through.)
        burst = [await limiter.hit("refill", limit=2, window=2.0) for _ in range(3)]
        await asyncio.sleep(1.3)

        later = [await limiter.hit("refill", limit=2, window=2.0) for _ in range(2)]

        assert [d.allowed for d in burst] == [True, True, False]
        assert 0 < burst[2].retry_after <= 1.0
        assert [d.allowed for d in later] == [True, False]

    async def test_window_slides_and_refusals_are_not_counted(self, limiter: Limiter) -> None:
        for _ in range(4):
            await limiter.hit("slide", limit=2, window=0.3)
        await asyncio.sleep(0.4)

        again = [await limiter.hit("slide", limit=2, window=0.3) for _ in range(3)]

        assert [d.allowed for d in again] == [True, True, False]

    async def test_peek_counts_nothing(self, limiter: Limiter) -> None:
        for _ in range(5):
            assert (await limiter.peek("p", limit=1, window=60)).allowed

        await limiter.hit("p", limit=1, window=60)

        assert not (await limiter.peek("p", limit=1, window=60)).allowed


class TestLeases:
    async def test_at_most_limit_held_and_release_frees_one(self, limiter: Limiter) -> None:
        held = [await limiter.acquire("s", f"t{i}", limit=2, lease=60) for i in range(3)]
        await limiter.release("s", "t0")
        after_release = await limiter.acquire("s", "t3", limit=2, lease=60)

        assert [d.allowed for d in held] == [True, True, False]
        assert held[2].retry_after > 0
        assert after_release.allowed

    async def test_a_lease_expires_by_itself(self, limiter: Limiter) -> None:
        await limiter.acquire("e", "dead-process", limit=1, lease=0.2)
        refused = await limiter.acquire("e", "next", limit=1, lease=60)
        await asyncio.sleep(0.3)

        assert not refused.allowed
        assert (await limiter.acquire("e", "next", limit=1, lease=60)).allowed

    async def test_concurrent_acquires_never_overshoot(self, limiter: Limiter) -> None:
        decisions = await asyncio.gather(
            *(limiter.acquire("c", uuid.uuid4().hex, limit=3, lease=60) for _ in range(30))
        )

        assert sum(d.allowed for d in decisions) == 3


class TestCounters:
    async def test_add_accumulates_and_total_reads(self, limiter: Limiter) -> None:
        assert await limiter.total("tokens") == 0

        await limiter.add("tokens", 70, ttl=60)
        value = await limiter.add("tokens", 5, ttl=60)

        assert value == 75
        assert await limiter.total("tokens") == 75

    async def test_counter_expires_with_its_ttl(self, limiter: Limiter) -> None:
        await limiter.add("short", 10, ttl=0.2)
        await asyncio.sleep(0.3)

        assert await limiter.total("short") == 0


class TestMemoryLimiter:
    async def test_idle_keys_are_swept(self) -> None:
        now = [0.0]
        limiter = MemoryLimiter(clock=lambda: now[0])
        for i in range(2000):
            await limiter.hit(f"client-{i}", limit=5, window=1)
        now[0] = 10.0
        for _ in range(2048):
            await limiter.peek("still-here", limit=5, window=1)

        assert len(limiter._buckets) <= 1

    async def test_headers_follow_the_refill(self) -> None:
        now = [100.0]
        limiter = MemoryLimiter(clock=lambda: now[0])
        spent = [await limiter.hit("h", limit=4, window=60) for _ in range(4)]
        now[0] = 130.0  # half the window: two events back

        half = await limiter.peek("h", limit=4, window=60)

        assert [d.remaining for d in spent] == [3, 2, 1, 0]
        assert spent[3].retry_after == 15  # one event every 15 s
        assert spent[3].reset_after == 60
        assert (half.allowed, half.remaining, half.retry_after, half.reset_after) == (
            True,
            2,
            0,
            30,
        )

    async def test_a_key_costs_the_same_at_any_limit(self) -> None:
        # One number per key: a key allowed a million requests a minute holds no more than
        # one allowed ten (a log of timestamps held 50,000 floats here, over 1.5 MB).
        limiter = MemoryLimiter()
        await limiter.hit("warm", limit=1_000_000, window=60)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(50_000):
                await limiter.hit("busy", limit=1_000_000, window=60)
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert after - before < 10_000


class TestRedisLimiter:
    async def test_unreachable_redis_is_a_503_not_an_unmetered_request(self) -> None:
        limiter = RedisLimiter("redis://127.0.0.1:1/0", prefix="x:")
        try:
            with pytest.raises(LimiterUnavailable) as caught:
                await limiter.hit("k", limit=1, window=60)
        finally:
            await limiter.aclose()

        assert caught.value.status_code == 503
        assert caught.value.headers["Retry-After"] == "1"
