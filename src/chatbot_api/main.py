"""The application factory. `create_app(settings)` and its lifespan own every resource: the
engine, the sessionmaker, the provider and the turn manager. Nothing connects or loads at
import time; `app_factory()` is what `chatbot-api serve` hands to uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

from fastapi import FastAPI

from chatbot_api import __version__, fast_routes, memory, security
from chatbot_api.auth.bootstrap import bootstrap
from chatbot_api.auth.router import router as keys_router
from chatbot_api.chat import checkpoints
from chatbot_api.chat.router import router as chat_router
from chatbot_api.chat.turns import TurnManager
from chatbot_api.config import LLMSettings, ResolvedProvider, Settings
from chatbot_api.conversations.router import router as conversations_router
from chatbot_api.db import create_engine, create_sessionmaker
from chatbot_api.errors import error_responses, install_error_handlers
from chatbot_api.health import router as health_router
from chatbot_api.limits.service import Generations, create_limiter
from chatbot_api.llm.base import Provider
from chatbot_api.llm.resilient import ResilientProvider, RetryPolicy
from chatbot_api.middleware import BodySizeLimit

logger = logging.getLogger(__name__)

# Context windows of the default hosted models, used unless LLM_CONTEXT_WINDOW is set.
GROQ_CONTEXT_WINDOW = 131_072
OPENAI_CONTEXT_WINDOW = 128_000


def _build_one(resolved: ResolvedProvider, llm: LLMSettings) -> Provider:
    if resolved.kind == "local":
        from chatbot_api.llm.local import LocalProvider

        return LocalProvider(
            n_ctx=llm.context_window or llm.local_n_ctx,
            n_threads=llm.local_n_threads,
            model_name=resolved.model,
            timeouts=llm.timeouts,
        )
    from chatbot_api.llm.openai_compat import OpenAICompatProvider

    assert resolved.base_url is not None
    default_window = GROQ_CONTEXT_WINDOW if resolved.kind == "groq" else OPENAI_CONTEXT_WINDOW
    return OpenAICompatProvider(
        name=resolved.kind,
        base_url=resolved.base_url,
        api_key=resolved.api_key.get_secret_value() if resolved.api_key else None,
        model=resolved.model,
        context_window=llm.context_window or default_window,
        timeouts=llm.timeouts,
    )


def build_provider(settings: Settings) -> Provider:
    """The configured provider and its `LLM_FALLBACKS`, behind retries and circuit breakers."""
    llm = settings.llm
    chain = [_build_one(r, llm) for r in [llm.resolve(), *llm.resolve_fallbacks()]]
    return ResilientProvider(
        chain,
        policy=RetryPolicy(max_retries=llm.max_retries, max_retry_after=llm.retry_after_cap),
        failure_threshold=llm.breaker_failures,
        cooldown=llm.breaker_cooldown,
    )


def _flip_readiness_on_sigterm(app: FastAPI) -> None:
    """Report not-ready as soon as SIGTERM arrives, while uvicorn lets open streams finish,
    then hand the signal on to uvicorn's own handler."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach only the main thread (an app served from a worker thread)
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        app.state.shutting_down = True
        previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.db)
        provider = build_provider(settings)
        await provider.start()
        sessionmaker = create_sessionmaker(engine)
        turns = TurnManager(engine=engine, provider=provider, settings=settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker
        app.state.provider = provider
        app.state.turns = turns
        limits = settings.limits
        limiter = create_limiter(
            limits.backend, redis_url=limits.redis_url, prefix=limits.redis_prefix
        )
        # A stream slot outlives the longest generation, so a dead process frees its slots.
        generations = Generations(limiter, stream_lease=settings.llm.total_timeout + 60)
        app.state.limiter = limiter
        app.state.generations = generations
        app.state.shutting_down = False
        security.install_log_redaction()
        await bootstrap(
            sessionmaker,
            server_secret=settings.auth.server_secret.get_secret_value(),
            base_url=settings.auth.public_url,
            create_admin_key=settings.auth.mode == "enabled" and settings.auth.bootstrap_admin_key,
        )
        _flip_readiness_on_sigterm(app)
        reaper = asyncio.create_task(turns.reap_forever(), name="reaper")
        checkpointer = asyncio.create_task(
            checkpoints.checkpoint_forever(
                turns, interval=settings.reliability.stream_checkpoint_interval
            ),
            name="checkpointer",
        )
        logger.info("serving with provider=%s model=%s", provider.name, provider.model)
        try:
            yield
        finally:
            # Order: stop advertising readiness, let running turns store their replies, then
            # close the provider and the pool they were using.
            app.state.shutting_down = True
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await turns.drain(settings.reliability.shutdown_grace_seconds)
            # Only now: the turns let finish during the grace still had their claims renewed.
            checkpointer.cancel()
            await asyncio.gather(checkpointer, return_exceptions=True)
            await generations.drain(5.0)
            await limiter.aclose()
            await provider.aclose()
            await engine.dispose()

    app = FastAPI(
        title=settings.project_name,
        version=__version__,
        description="REST + Server-Sent Events API for LLM chatbots with persistent memory.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    install_error_handlers(app)
    app.include_router(health_router)
    # Every API route may answer these; routes document their own specific ones on top.
    api_errors = error_responses(400, 401, 403, 404, 413, 422, 429, 503)
    app.include_router(conversations_router, responses=api_errors)
    app.include_router(chat_router, responses=api_errors)
    app.include_router(keys_router, responses=api_errors)
    fast_routes.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    security.install(app, cors_origins=settings.cors_origin_list)
    return app


def app_factory() -> FastAPI:
    """Entry point for uvicorn (`--factory`): settings from the environment and `.env`. Once
    the app is built, what the process has loaded is frozen out of the collector's walk
    (`memory.freeze_startup_heap`)."""
    app = create_app(Settings())
    memory.freeze_startup_heap()
    return app
