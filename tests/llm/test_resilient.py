"""ResilientProvider over real OpenAI-compatible clients and two fake servers on loopback.

Sleeps are recorded instead of slept, and the breakers read a clock the tests move by hand.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import pytest

from chatbot_api.llm import errors
from chatbot_api.llm.base import Provider, Routed, StreamEvent, TextDelta, Usage
from chatbot_api.llm.openai_compat import OpenAICompatProvider
from chatbot_api.llm.resilient import CircuitBreaker, ResilientProvider, RetryPolicy
from chatbot_api.testing.fake_llm import FakeLLM, RecordedRequest, Script, unreachable_url
from tests.llm.conftest import MESSAGES, OPTIONS, RELAXED

REPLY = "Hello from the chain."


class Rig:
    """Two fake servers, providers pointed at them, a recording sleep and a manual clock."""

    def __init__(self, primary: FakeLLM, fallback: FakeLLM) -> None:
        self.primary = primary
        self.fallback = fallback
        self.delays: list[float] = []
        self.now = 0.0
        self.members: list[OpenAICompatProvider] = []

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    def clock(self) -> float:
        return self.now

    def member(self, name: str, base_url: str, context_window: int = 8192) -> OpenAICompatProvider:
        provider = OpenAICompatProvider(
            name=name,
            base_url=base_url,
            api_key=None,
            model=f"{name}-model",
            context_window=context_window,
            timeouts=RELAXED,
        )
        self.members.append(provider)
        return provider

    async def chain(
        self, *, fallback: bool = True, primary_url: str | None = None, **options: Any
    ) -> ResilientProvider:
        members: list[Provider] = [self.member("primary", primary_url or self.primary.base_url)]
        if fallback:
            members.append(self.member("fallback", self.fallback.base_url))
        options.setdefault("random", random.Random(7).random)
        provider = ResilientProvider(members, clock=self.clock, sleep=self.sleep, **options)
        await provider.start()
        return provider


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with (
        FakeLLM(default=Script(reply=REPLY)) as primary,
        FakeLLM(default=Script(reply=REPLY)) as fallback,
    ):
        rig = Rig(primary, fallback)
        yield rig
        for member in rig.members:
            await member.aclose()


async def collect(provider: ResilientProvider) -> list[StreamEvent]:
    return [event async for event in provider.stream(MESSAGES, OPTIONS)]


async def fail(provider: ResilientProvider) -> tuple[list[StreamEvent], errors.ProviderError]:
    events: list[StreamEvent] = []
    try:
        async for event in provider.stream(MESSAGES, OPTIONS):
            events.append(event)
    except errors.ProviderError as error:
        return events, error
    pytest.fail(f"the stream did not fail: {events}")


def text(events: list[StreamEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def routed(events: list[StreamEvent]) -> list[Routed]:
    return [event for event in events if isinstance(event, Routed)]


async def was_cancelled(request: RecordedRequest) -> bool:
    await asyncio.wait_for(request.finished.wait(), timeout=1.0)
    return request.cancelled


class TestRetryPolicy:
    def test_backoff_is_full_jitter_under_the_capped_exponential(self) -> None:
        policy = RetryPolicy()
        seeded, reference = random.Random(42), random.Random(42)
        delays = [policy.backoff(n, seeded.random) for n in range(7)]
        caps = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        assert delays == [reference.random() * cap for cap in caps]
        assert all(0 <= delay < cap for delay, cap in zip(delays, caps, strict=True))

    @pytest.mark.parametrize(
        ("error", "retry", "expected"),
        [
            (errors.ProviderRequestRejected("bad", status=400), 0, None),
            (errors.ProviderUnavailable("down", status=503), 2, None),  # retries spent
            (errors.ProviderRateLimited("slow", retry_after=2.0), 0, 2.0),
            (errors.ProviderRateLimited("slow", retry_after=10.0), 1, 10.0),
            (errors.ProviderRateLimited("slow", retry_after=10.5), 0, None),  # over the cap
            (errors.ProviderTimeout("late"), 1, 0.5),  # backoff: random() is 0.5 here
        ],
    )
    def test_delay_decisions(
        self, error: errors.ProviderError, retry: int, expected: float | None
    ) -> None:
        assert RetryPolicy().delay(error, retry, lambda: 0.5) == expected


class TestCircuitBreaker:
    def test_opens_after_consecutive_failures_then_lets_one_trial_through(self) -> None:
        now = [0.0]
        breaker = CircuitBreaker(3, 30.0, clock=lambda: now[0])
        breaker.failure()
        breaker.failure()
        breaker.success()  # not consecutive: the count starts again
        for _ in range(3):
            assert breaker.allow()
            breaker.failure()
        assert (breaker.state, breaker.allow()) == ("open", False)
        now[0] = 29.9
        assert not breaker.allow()
        now[0] = 30.0
        assert breaker.allow()
        assert not breaker.allow()  # one trial at a time
        breaker.failure()
        assert (breaker.state, breaker.allow()) == ("open", False)
        now[0] = 60.0
        assert breaker.allow()
        breaker.success()
        assert (breaker.state, breaker.allow(), breaker.allow()) == ("closed", True, True)

    def test_an_abandoned_trial_frees_the_slot(self) -> None:
        now = [0.0]
        breaker = CircuitBreaker(1, 5.0, clock=lambda: now[0])
        breaker.failure()
        now[0] = 5.0
        assert breaker.allow()
        assert not breaker.allow()
        breaker.release()
        assert breaker.allow()


class TestRetries:
    async def test_503_twice_then_success_makes_three_requests(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=503, fail_times=2))
        events = await collect(await rig.chain(random=random.Random(3).random))
        assert events[0] == Routed("primary", "primary-model", attempts=3, fallbacks=0)
        assert len(routed(events)) == 1
        assert text(events) == REPLY
        assert (len(rig.primary.requests), len(rig.fallback.requests)) == (3, 0)
        expected = random.Random(3)
        assert rig.delays == [expected.random() * 0.5, expected.random() * 1.0]

    async def test_429_with_a_short_retry_after_waits_that_long(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=429, retry_after=2))
        events = await collect(await rig.chain())
        assert rig.delays == [2.0]
        assert routed(events) == [Routed("primary", "primary-model", attempts=2)]
        assert text(events) == REPLY

    async def test_429_with_a_long_retry_after_fails_fast_without_a_fallback(
        self, rig: Rig
    ) -> None:
        rig.primary.enqueue(Script(status=429, retry_after=120))
        events, error = await fail(await rig.chain(fallback=False))
        assert isinstance(error, errors.ProviderRateLimited)
        assert (error.retry_after, events, rig.delays) == (120.0, [], [])
        assert len(rig.primary.requests) == 1

    async def test_429_with_a_long_retry_after_goes_to_the_fallback(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=429, retry_after=120))
        events = await collect(await rig.chain())
        assert routed(events) == [Routed("fallback", "fallback-model", attempts=2, fallbacks=1)]
        assert (rig.delays, text(events)) == ([], REPLY)

    async def test_400_is_not_retried(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=400))
        _, error = await fail(await rig.chain(fallback=False))
        assert type(error) is errors.ProviderRequestRejected
        assert (len(rig.primary.requests), rig.delays) == (1, [])

    async def test_spent_retries_raise_the_last_error(self, rig: Rig) -> None:
        rig.primary.default = Script(status=503)
        _, error = await fail(await rig.chain(fallback=False))
        assert (type(error), error.status) == (errors.ProviderUnavailable, 503)
        assert (len(rig.primary.requests), len(rig.delays)) == (3, 2)


class TestFallback:
    async def test_refused_primary_hands_over_to_the_fallback(self, rig: Rig) -> None:
        events = await collect(await rig.chain(primary_url=unreachable_url()))
        # Refused connections are retryable: the primary gets its 3 calls before handing over.
        assert routed(events) == [Routed("fallback", "fallback-model", attempts=4, fallbacks=1)]
        assert events[0] == routed(events)[0]
        assert text(events) == REPLY
        assert len(rig.delays) == 2

    async def test_non_retryable_error_hands_over_at_once(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=401))
        events = await collect(await rig.chain())
        assert routed(events) == [Routed("fallback", "fallback-model", attempts=2, fallbacks=1)]
        assert (len(rig.primary.requests), rig.delays) == (1, [])

    async def test_failure_after_the_first_token_propagates(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(reply="a b c d", after_tokens=2, then="reset"))
        events, error = await fail(await rig.chain())
        assert events == [Routed("primary", "primary-model"), TextDelta("a"), TextDelta(" b")]
        assert type(error) is errors.ProviderUnavailable
        assert (len(rig.primary.requests), len(rig.fallback.requests)) == (1, 0)

    async def test_a_chosen_model_goes_to_the_primary_only(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(status=401))
        chosen = replace(OPTIONS, model="chosen-model")
        provider = await rig.chain()
        events = [e async for e in provider.stream(MESSAGES, chosen)]
        assert rig.primary.requests[0].body["model"] == "chosen-model"
        assert rig.fallback.requests[0].body["model"] == "fallback-model"
        assert routed(events) == [Routed("fallback", "fallback-model", attempts=2, fallbacks=1)]

    async def test_a_chosen_model_is_what_routed_reports(self, rig: Rig) -> None:
        chosen = replace(OPTIONS, model="chosen-model")
        events = [e async for e in (await rig.chain()).stream(MESSAGES, chosen)]
        assert routed(events) == [Routed("primary", "chosen-model")]


class TestBreakerInTheChain:
    async def test_open_primary_is_not_called_until_the_cooldown(self, rig: Rig) -> None:
        rig.primary.default = Script(status=503)
        provider = await rig.chain(
            policy=RetryPolicy(max_retries=0), failure_threshold=2, cooldown=30.0
        )
        for _ in range(2):
            await collect(provider)
        assert len(rig.primary.requests) == 2
        rig.now = 29.0
        events = await collect(provider)
        assert routed(events) == [Routed("fallback", "fallback-model", attempts=1, fallbacks=1)]
        assert len(rig.primary.requests) == 2  # skipped without a call
        rig.now = 30.0
        await collect(provider)  # the trial fails: open again
        await collect(provider)
        assert len(rig.primary.requests) == 3
        rig.primary.default = Script(reply=REPLY)
        rig.now = 60.0
        events = await collect(provider)  # the trial succeeds: closed
        assert routed(events) == [Routed("primary", "primary-model")]
        await collect(provider)
        assert len(rig.primary.requests) == 5

    async def test_all_open_fails_fast_with_unavailable(self, rig: Rig) -> None:
        rig.primary.default = rig.fallback.default = Script(status=503)
        provider = await rig.chain(policy=RetryPolicy(max_retries=0), failure_threshold=1)
        _, first = await fail(provider)
        assert first.status == 503
        _, error = await fail(provider)
        assert type(error) is errors.ProviderUnavailable
        assert "cooling down" in str(error)
        assert (len(rig.primary.requests), len(rig.fallback.requests), rig.delays) == (1, 1, [])


class TestEarlyClose:
    async def test_aclose_after_the_first_delta_cancels_upstream(self, rig: Rig) -> None:
        rig.primary.enqueue(Script(reply="w " * 100, token_delay=0.05))
        provider = await rig.chain()
        async with aclosing(provider.stream(MESSAGES, OPTIONS)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
        assert await was_cancelled(rig.primary.requests[0])

    async def test_cancelling_while_waiting_for_the_first_token_cancels_upstream(
        self, rig: Rig
    ) -> None:
        rig.primary.enqueue(Script(ttft=3.0))
        provider = await rig.chain(failure_threshold=1)
        task = asyncio.create_task(collect(provider))
        async with asyncio.timeout(2.0):
            while not rig.primary.requests:  # noqa: ASYNC110 (the fake has no arrival event)
                await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await was_cancelled(rig.primary.requests[0])
        assert provider.breakers[0].state == "closed"  # a caller going away is no failure


class TestProviderMembers:
    async def test_capabilities_are_conservative_over_the_chain(self, rig: Rig) -> None:
        primary = rig.member("primary", rig.primary.base_url, context_window=8192)
        fallback = rig.member("fallback", rig.fallback.base_url, context_window=4096)
        for _ in range(20):  # teach the fallback that its prompts cost twice the estimate
            fallback.observe_usage(100, Usage(200, 1, 201))
        provider = ResilientProvider([primary, fallback])
        sample = "How many tokens does this cost?"
        assert isinstance(provider, Provider)
        assert (provider.name, provider.model, provider.context_window) == (
            "primary",
            "primary-model",
            4096,
        )
        assert provider.count_tokens(sample) == fallback.count_tokens(sample)
        assert provider.count_tokens(sample) > primary.count_tokens(sample)
        assert provider.supports_streaming
        assert provider.message_overhead() == 4
        assert provider.max_tokens_per_byte() == fallback.max_tokens_per_byte() > 1

    async def test_usage_calibrates_the_member_that_answered(self, rig: Rig) -> None:
        provider = await rig.chain(primary_url=unreachable_url())
        await collect(provider)
        for _ in range(20):
            provider.observe_usage(100, Usage(300, 1, 301))
        primary, fallback = rig.members
        assert primary.estimator.observations == 0
        assert fallback.estimator.observations == 20

    async def test_start_and_aclose_every_member(self, rig: Rig) -> None:
        provider = await rig.chain()
        assert all(member.is_ready() for member in rig.members)
        await rig.members[0].aclose()
        assert provider.is_ready()  # any member will do
        await provider.aclose()
        assert not any(member.is_ready() for member in rig.members)
        assert not provider.is_ready()

    def test_an_empty_chain_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            ResilientProvider([])


class TestThePromptIsLetGo:
    async def test_it_serves_retries_then_no_stream_keeps_it(self, rig: Rig) -> None:
        """A long history is not held by every stream in flight: once a member has answered,
        nothing is retried, and neither generator refers to the prompt any more."""
        rig.primary.enqueue(Script(status=503), Script(deltas=("a", "b", "c"), token_delay=0.05))
        provider = await rig.chain(fallback=False)
        prompt = list(MESSAGES)

        async with aclosing(provider.stream(prompt, OPTIONS)) as stream:
            first = await anext(stream)
            assert first == Routed("primary", "primary-model", attempts=2, fallbacks=0)
            assert await anext(stream) == TextDelta("a")
            gc.collect()
            holders = [r for r in gc.get_referrers(prompt) if inspect.isasyncgen(r)]
            assert holders == []
            assert [e async for e in stream if isinstance(e, TextDelta)] == [
                TextDelta("b"),
                TextDelta("c"),
            ]
        # The retry was sent the whole prompt.
        assert [m["content"] for m in rig.primary.requests[1].body["messages"]] == [
            m.content for m in MESSAGES
        ]
