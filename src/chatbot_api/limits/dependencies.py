"""The limiter built in the lifespan, and `TurnGuardDep`: the checks a turn passes before it
starts (model allowlist, `max_tokens` cap, daily tokens, concurrent streams).

Every dependency here is `async def`, even those that never await: FastAPI runs a plain `def`
in a worker thread, a thread switch on every request for nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from chatbot_api.auth.dependencies import Caller
from chatbot_api.config import Settings
from chatbot_api.limits import service
from chatbot_api.limits.base import Limiter

T = TypeVar("T", bound=service.Outcome)


async def _limiter(request: Request) -> Limiter:
    limiter: Limiter = request.app.state.limiter
    return limiter


LimiterDep = Annotated[Limiter, Depends(_limiter)]


@dataclass(frozen=True, slots=True)
class TurnGuard:
    caller: Caller
    generations: service.Generations
    default_model: str
    allowed_models: list[str]
    max_tokens_cap: int

    def generation(self, model: str | None, max_tokens: int | None) -> tuple[str | None, int]:
        """The model to ask for (None: the provider's default) and the clamped reply cap;
        `ModelNotAllowed` (403) outside the allowlist."""
        chosen, tokens = service.resolve_generation(
            model=model,
            max_tokens=max_tokens,
            default_model=self.default_model,
            allowed_models=self.allowed_models,
            max_tokens_cap=self.max_tokens_cap,
        )
        return (None if chosen == self.default_model else chosen), tokens

    async def start(self, begin: Callable[[], Awaitable[T]]) -> T:
        """Run `begin()` (which starts the turn) within the caller's limits."""
        return await self.generations.start(self.caller.subject, self.caller.limits, begin)


def turn_guard(request: Request, caller: Caller) -> TurnGuard:
    """The caller's guard, from what the lifespan built (used by `chat.dependencies`)."""
    settings: Settings = request.app.state.settings
    return TurnGuard(
        caller=caller,
        generations=request.app.state.generations,
        default_model=request.app.state.provider.model,
        allowed_models=settings.llm.allowed_model_list,
        max_tokens_cap=settings.llm.max_tokens,
    )
