"""Settings: one `Settings` object with nested groups, read from the environment and `.env`.

The variable names of the original spec are kept (`DATABASE_URL`, `GROQ_API_KEY`,
`LLM_PROVIDER`, `LLM_BASE_URL`, `LLM_API_KEY`, `LLM_MODEL`, `PROJECT_NAME`); every other
setting has a safe default. Tests build `Settings(...)` directly and pass it to
`create_app()`, so nothing here is read at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatbot_api.llm.base import Timeouts

GROQ_BASE_URL = "https://api.groq.com/openai/v1"
GROQ_DEFAULT_MODEL = "llama-3.3-70b-versatile"
OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
LOCAL_MODEL = "SmolLM2-135M-Instruct"

ProviderName = Literal["local", "groq", "openai"]


def _group(prefix: str = "") -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
    )


def normalise_database_url(url: str) -> str:
    """Accept the plain `postgres://` / `postgresql://` URLs that Railway and Heroku hand out."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain) :]
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


class DatabaseSettings(BaseSettings):
    model_config = _group("DB_")

    # repr=False: a database URL may carry a password.
    url: str = Field(
        default="sqlite+aiosqlite:///./chatbot.db",
        repr=False,
        validation_alias=AliasChoices("DATABASE_URL", "DB_URL"),
    )
    pool_size: int = Field(5, ge=1)
    # No overflow by default: SQLAlchemy closes an overflow connection when it is checked in
    # to a full pool, so load above `pool_size` opens and closes PostgreSQL sessions all the
    # time (a new backend process each). On the bench's send load, two workers at 5 + 5 opened
    # a session every 7-13 turns and served 560-690 turns/s; at 5 + 0, none and 975-990/s.
    # A turn holds a connection for a few statements, so waiting for one costs less.
    max_overflow: int = Field(
        0,
        ge=0,
        description="Connections opened beyond the pool under load, each closed after use.",
    )
    pool_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a pooled connection.")
    connect_timeout: float = Field(5.0, gt=0)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return normalise_database_url(value)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class LLMSettings(BaseSettings):
    model_config = _group("LLM_")

    provider: ProviderName | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str | None = None
    groq_api_key: SecretStr | None = Field(default=None, validation_alias="GROQ_API_KEY")
    context_window: int | None = Field(None, ge=256, description="Override the model's window.")
    max_tokens: int = Field(1024, ge=1, description="Room kept for the reply, and its cap.")
    temperature: float | None = Field(None, ge=0, le=2)
    connect_timeout: float = Field(10.0, gt=0)
    first_token_timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(30.0, gt=0)
    total_timeout: float = Field(300.0, gt=0)
    local_n_ctx: int = Field(4096, ge=512)
    local_n_threads: int | None = Field(None, ge=1)
    fallbacks: str | None = Field(
        default=None,
        description="Providers tried, in order, when the primary fails before its first token: "
        "comma-separated `kind[:model][@base_url]`, e.g. `groq:llama-3.1-8b-instant,local`.",
    )
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    max_retries: int = Field(2, ge=0, le=10)
    retry_after_cap: float = Field(10.0, ge=0, description="Longest Retry-After worth waiting.")
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown: float = Field(30.0, gt=0)
    allowed_models: str | None = Field(
        default=None,
        description="Models a request may ask for besides the default one, comma-separated; "
        "any other is a 403.",
    )

    @property
    def allowed_model_list(self) -> list[str]:
        return [m for m in (x.strip() for x in (self.allowed_models or "").split(",")) if m]

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            first_token=self.first_token_timeout,
            idle=self.idle_timeout,
            total=self.total_timeout,
        )

    def resolve(self) -> ResolvedProvider:
        """Which provider to build: an explicit `LLM_PROVIDER` wins, then a Groq key, then a
        custom `LLM_BASE_URL` (an OpenAI-compatible server), then the embedded model, so the
        service answers with zero configuration."""
        kind: ProviderName
        if self.provider is not None:
            kind = self.provider
        elif self.groq_api_key is not None:
            kind = "groq"
        elif self.base_url is not None:
            kind = "openai"
        else:
            kind = "local"
        if kind == "local":
            return ResolvedProvider("local", None, None, self.model or LOCAL_MODEL)
        key = self.api_key or (self.groq_api_key if kind == "groq" else self.openai_api_key)
        default_url, default_model = (
            (GROQ_BASE_URL, GROQ_DEFAULT_MODEL)
            if kind == "groq"
            else (OPENAI_BASE_URL, OPENAI_DEFAULT_MODEL)
        )
        return ResolvedProvider(
            kind, (self.base_url or default_url).rstrip("/"), key, self.model or default_model
        )

    def resolve_fallbacks(self) -> list[ResolvedProvider]:
        """The `LLM_FALLBACKS` chain. Keys come from `GROQ_API_KEY` (groq) and
        `OPENAI_API_KEY` (openai); a fallback never inherits the primary's overrides."""
        chain: list[ResolvedProvider] = []
        for entry in filter(None, (e.strip() for e in (self.fallbacks or "").split(","))):
            spec, _, url = entry.partition("@")
            kind, _, model = spec.partition(":")
            if kind == "local":
                chain.append(ResolvedProvider("local", None, None, model or LOCAL_MODEL))
            elif kind == "groq":
                chain.append(
                    ResolvedProvider(
                        "groq", url or GROQ_BASE_URL, self.groq_api_key, model or GROQ_DEFAULT_MODEL
                    )
                )
            elif kind == "openai":
                chain.append(
                    ResolvedProvider(
                        "openai",
                        (url or OPENAI_BASE_URL).rstrip("/"),
                        self.openai_api_key,
                        model or OPENAI_DEFAULT_MODEL,
                    )
                )
            else:
                raise ValueError(f"LLM_FALLBACKS: unknown provider {kind!r} in {entry!r}")
        return chain


@dataclass(frozen=True, slots=True)
class ResolvedProvider:
    kind: ProviderName
    base_url: str | None
    api_key: SecretStr | None
    model: str


class LimitSettings(BaseSettings):
    model_config = _group("LIMITS_")

    max_message_chars: int = Field(
        default=32_000,
        ge=1,
        validation_alias=AliasChoices("MAX_MESSAGE_CHARS", "LIMITS_MAX_MESSAGE_CHARS"),
    )
    max_body_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        validation_alias=AliasChoices("MAX_BODY_BYTES", "LIMITS_MAX_BODY_BYTES"),
    )
    # Per-key defaults; a key can carry its own (`chatbot-api keys create --rpm ...`).
    requests_per_minute: int = Field(
        default=60,
        ge=1,
        validation_alias=AliasChoices(
            "RATE_LIMIT_REQUESTS_PER_MINUTE", "LIMITS_REQUESTS_PER_MINUTE"
        ),
    )
    concurrent_streams: int = Field(
        default=4,
        ge=1,
        validation_alias=AliasChoices("RATE_LIMIT_CONCURRENT_STREAMS", "LIMITS_CONCURRENT_STREAMS"),
        description="Generations (streamed or not) one key may have in flight at once.",
    )
    tokens_per_day: int = Field(
        default=1_000_000,
        ge=1,
        validation_alias=AliasChoices("RATE_LIMIT_TOKENS_PER_DAY", "LIMITS_TOKENS_PER_DAY"),
        description="Prompt + completion tokens, as the provider reports them, per UTC day.",
    )
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="`redis` when several processes must share the limits."
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        repr=False,
        validation_alias=AliasChoices("REDIS_URL", "LIMITS_REDIS_URL"),
    )
    redis_prefix: str = Field(default="chatbot:limits:", min_length=1)


class ReliabilitySettings(BaseSettings):
    model_config = _group()

    conversation_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        validation_alias="CONVERSATION_LEASE_SECONDS",
        description="A turn's claim on its conversation; renewed at every checkpoint, so it "
        "only lapses when the process generating the reply has died.",
    )
    stream_checkpoint_interval: float = Field(
        default=1.0,
        gt=0,
        validation_alias="STREAM_CHECKPOINT_INTERVAL",
        description="Seconds between stores of a partial reply (and cancel-request polls).",
    )
    idempotency_ttl_seconds: float = Field(
        default=24 * 3600.0, gt=0, validation_alias="IDEMPOTENCY_TTL_SECONDS"
    )
    shutdown_grace_seconds: float = Field(
        default=20.0, ge=0, validation_alias="SHUTDOWN_GRACE_SECONDS"
    )


# The documented development default: refused outside development (see `Settings`).
DEV_SERVER_SECRET = "dev-insecure-server-secret-change-me"


class AuthSettings(BaseSettings):
    model_config = _group("AUTH_")

    mode: Literal["enabled", "disabled"] = Field(
        default="enabled",
        description="`disabled` serves one local user with no key (loopback binds only).",
    )
    server_secret: SecretStr = Field(
        default=SecretStr(DEV_SERVER_SECRET),
        description="The HMAC key API keys are hashed under; changing it invalidates them.",
    )
    allow_disabled_on_public: bool = Field(
        default=False, description="Let `AUTH_MODE=disabled` serve on a non-loopback address."
    )
    failed_attempts_per_minute: int = Field(
        default=10, ge=1, description="Bad keys one client may send per minute before a 429."
    )
    bootstrap_admin_key: bool = Field(
        default=True, description="On a first start with no key, create and print an admin key."
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL shown in the first-start curl line."
    )


class Settings(BaseSettings):
    model_config = _group()

    project_name: str = Field(default="AI Chatbot API", validation_alias="PROJECT_NAME")
    environment: Literal["development", "production", "test"] = Field(
        default="development", validation_alias=AliasChoices("ENVIRONMENT", "APP_ENV")
    )
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")
    docs_enabled: bool = Field(default=True, validation_alias="DOCS_ENABLED")
    default_system_prompt: str = Field(
        default=(
            "You are a helpful, concise assistant. "
            "Always answer in the language the user writes in."
        ),
        validation_alias="DEFAULT_SYSTEM_PROMPT",
    )
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    reliability: ReliabilitySettings = Field(default_factory=ReliabilitySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    cors_origins: str | None = Field(
        default=None,
        validation_alias="CORS_ORIGINS",
        description="Browser origins allowed to call the API, comma-separated; none: no CORS.",
    )

    @property
    def cors_origin_list(self) -> list[str]:
        return [o for o in (x.strip() for x in (self.cors_origins or "").split(",")) if o]

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        secret = self.auth.server_secret.get_secret_value()
        if self.environment != "development" and (secret == DEV_SERVER_SECRET or len(secret) < 32):
            raise ValueError(
                "AUTH_SERVER_SECRET must be set to a random value of at least 32 characters "
                "outside development (for example: python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))')"
            )
        return self


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
