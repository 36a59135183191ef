"""Fixtures for the LLM layer: a real fake server on loopback and providers pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from chatbot_api.llm import errors
from chatbot_api.llm.base import ChatMessage, GenerationOptions, StreamEvent, Timeouts
from chatbot_api.llm.openai_compat import OpenAICompatProvider
from chatbot_api.testing.fake_llm import FakeLLM, Script

API_KEY = "sk-llm-test-key-0123456789abcdef"
# Generous: tests that exercise a deadline pass their own, short Timeouts.
RELAXED = Timeouts(connect=5.0, first_token=5.0, idle=5.0, total=20.0)
MESSAGES = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Say hello in three words"),
]
OPTIONS = GenerationOptions(max_tokens=64)

ProviderFactory = Callable[..., Awaitable[OpenAICompatProvider]]


@dataclass
class Upstream:
    """The fake server, a started provider pointed at it, and a factory for more providers."""

    fake: FakeLLM
    provider: OpenAICompatProvider
    make: ProviderFactory

    def enqueue(self, *scripts: Script) -> None:
        self.fake.enqueue(*scripts)

    async def collect(self, provider: OpenAICompatProvider | None = None) -> list[StreamEvent]:
        return [event async for event in (provider or self.provider).stream(MESSAGES, OPTIONS)]

    async def fail(
        self, provider: OpenAICompatProvider | None = None
    ) -> tuple[list[StreamEvent], errors.ProviderError]:
        """Run a stream that must fail; return what it yielded first, and the error."""
        events: list[StreamEvent] = []
        try:
            async for event in (provider or self.provider).stream(MESSAGES, OPTIONS):
                events.append(event)
        except errors.ProviderError as error:
            return events, error
        pytest.fail(f"the stream did not fail: {events}")


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(api_key=API_KEY) as server:
        yield server


@pytest.fixture
async def make_provider(fake: FakeLLM) -> AsyncIterator[ProviderFactory]:
    """Start providers (default: the fake, the right key, relaxed deadlines); all are closed
    after the test."""
    started: list[OpenAICompatProvider] = []

    async def factory(**overrides: Any) -> OpenAICompatProvider:
        values: dict[str, Any] = {
            "name": "fake",
            "base_url": fake.base_url,
            "api_key": API_KEY,
            "model": "fake-model-1",
            "context_window": 8192,
            "timeouts": RELAXED,
        }
        provider = OpenAICompatProvider(**(values | overrides))
        await provider.start()
        started.append(provider)
        return provider

    yield factory
    for provider in started:
        await provider.aclose()


@pytest.fixture
async def upstream(fake: FakeLLM, make_provider: ProviderFactory) -> Upstream:
    return Upstream(fake, await make_provider(), make_provider)
