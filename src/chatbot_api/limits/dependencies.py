"""The limiter and the turn guard built in the lifespan, as dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from chatbot_api.limits.base import Limiter
from chatbot_api.limits.service import Generations


def _limiter(request: Request) -> Limiter:
    limiter: Limiter = request.app.state.limiter
    return limiter


def _generations(request: Request) -> Generations:
    generations: Generations = request.app.state.generations
    return generations


LimiterDep = Annotated[Limiter, Depends(_limiter)]
GenerationsDep = Annotated[Generations, Depends(_generations)]
