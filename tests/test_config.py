"""Settings: the fixed environment variable names, provider resolution, URL normalisation and
secret hygiene. Every test starts from an environment with none of our variables set and
builds settings with `_env_file=None`, so a developer's `.env` cannot leak in."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from chatbot_api.config import (
    DatabaseSettings,
    LimitSettings,
    LLMSettings,
    Settings,
    normalise_database_url,
)

OUR_VARIABLES = (
    "DATABASE_URL",
    "DB_URL",
    "GROQ_API_KEY",
    "LLM_PROVIDER",
    "LLM_BASE_URL",
    "LLM_API_KEY",
    "LLM_MODEL",
    "PROJECT_NAME",
    "ENVIRONMENT",
    "APP_ENV",
    "DOCS_ENABLED",
    "MAX_BODY_BYTES",
    "MAX_MESSAGE_CHARS",
)
GROQ_KEY = "gsk_live_secret_0123456789abcdef"
OTHER_KEY = "sk-other-secret-fedcba9876543210"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OUR_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def llm_settings() -> LLMSettings:
    return LLMSettings(_env_file=None)


def full_settings() -> Settings:
    return Settings(
        _env_file=None,
        db=DatabaseSettings(_env_file=None),
        llm=LLMSettings(_env_file=None),
        limits=LimitSettings(_env_file=None),
    )


class TestResolveProvider:
    def test_nothing_set_selects_the_embedded_model(self) -> None:
        resolved = llm_settings().resolve()

        assert resolved.kind == "local"
        assert resolved.base_url is None
        assert resolved.api_key is None

    def test_groq_key_selects_groq_with_its_default_model_and_url(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)

        resolved = llm_settings().resolve()

        assert resolved.kind == "groq"
        assert resolved.model == "llama-3.3-70b-versatile"
        assert resolved.base_url == "https://api.groq.com/openai/v1"
        assert resolved.api_key is not None
        assert resolved.api_key.get_secret_value() == GROQ_KEY

    def test_empty_groq_key_counts_as_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # docker-compose passes `GROQ_API_KEY=` through when the host has none.
        monkeypatch.setenv("GROQ_API_KEY", "")

        assert llm_settings().resolve().kind == "local"

    @pytest.mark.parametrize("provider", ["local", "openai"])
    def test_explicit_provider_wins_over_the_groq_key(
        self, monkeypatch: pytest.MonkeyPatch, provider: str
    ) -> None:
        monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
        monkeypatch.setenv("LLM_PROVIDER", provider)

        resolved = llm_settings().resolve()

        assert resolved.kind == provider
        # The Groq key is for Groq only: it is never sent to another provider.
        assert resolved.api_key is None

    def test_explicit_groq_without_a_key_resolves_with_no_key(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LLM_PROVIDER", "groq")

        resolved = llm_settings().resolve()

        assert resolved.kind == "groq"
        assert resolved.api_key is None
        assert resolved.base_url == "https://api.groq.com/openai/v1"

    def test_generic_variables_override_groq_defaults(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
        monkeypatch.setenv("LLM_BASE_URL", "https://groq-proxy.internal/v1/")
        monkeypatch.setenv("LLM_API_KEY", OTHER_KEY)
        monkeypatch.setenv("LLM_MODEL", "llama-3.1-8b-instant")

        resolved = llm_settings().resolve()

        assert resolved.kind == "groq"
        assert resolved.base_url == "https://groq-proxy.internal/v1"
        assert resolved.api_key is not None
        assert resolved.api_key.get_secret_value() == OTHER_KEY
        assert resolved.model == "llama-3.1-8b-instant"

    def test_base_url_alone_selects_an_openai_compatible_server(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LLM_BASE_URL", "http://localhost:11434/v1")

        resolved = llm_settings().resolve()

        assert resolved.kind == "openai"
        assert resolved.base_url == "http://localhost:11434/v1"
        assert resolved.api_key is None
        assert resolved.model == "gpt-4o-mini"

    def test_openai_provider_uses_the_openai_url_and_given_key(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LLM_PROVIDER", "openai")
        monkeypatch.setenv("LLM_API_KEY", OTHER_KEY)
        monkeypatch.setenv("LLM_MODEL", "gpt-4.1")

        resolved = llm_settings().resolve()

        assert resolved.base_url == "https://api.openai.com/v1"
        assert resolved.api_key is not None
        assert resolved.api_key.get_secret_value() == OTHER_KEY
        assert resolved.model == "gpt-4.1"

    def test_unknown_provider_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LLM_PROVIDER", "anthropic")

        with pytest.raises(ValidationError, match="provider"):
            llm_settings()


class TestNormaliseDatabaseUrl:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("postgres://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
            ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
            ("postgresql+asyncpg://u@db/app", "postgresql+asyncpg://u@db/app"),
            ("sqlite:///./chatbot.db", "sqlite+aiosqlite:///./chatbot.db"),
            ("sqlite:////data/chatbot.db", "sqlite+aiosqlite:////data/chatbot.db"),
            ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ],
    )
    def test_plain_urls_get_the_async_driver(self, given: str, expected: str) -> None:
        assert normalise_database_url(given) == expected


class TestDatabaseSettings:
    def test_default_is_a_local_sqlite_file(self) -> None:
        settings = DatabaseSettings(_env_file=None)

        assert settings.url == "sqlite+aiosqlite:///./chatbot.db"
        assert settings.is_sqlite

    def test_database_url_variable_is_read_and_normalised(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DATABASE_URL", "postgres://app:pw@db.railway.internal:5432/railway")

        settings = DatabaseSettings(_env_file=None)

        assert settings.url == "postgresql+asyncpg://app:pw@db.railway.internal:5432/railway"
        assert not settings.is_sqlite

    def test_url_given_in_code_is_normalised_too(self) -> None:
        settings = DatabaseSettings(_env_file=None, url="postgresql://u@h/d")

        assert settings.url == "postgresql+asyncpg://u@h/d"

    def test_nested_group_of_full_settings_reads_database_url(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DATABASE_URL", "sqlite:////var/lib/chatbot.db")

        settings = Settings(_env_file=None)

        assert settings.db.url == "sqlite+aiosqlite:////var/lib/chatbot.db"


class TestTopLevelSettings:
    def test_project_name_and_body_limit_use_the_fixed_names(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PROJECT_NAME", "Mi Chatbot")
        monkeypatch.setenv("MAX_BODY_BYTES", "4096")

        settings = full_settings()

        assert settings.project_name == "Mi Chatbot"
        assert settings.limits.max_body_bytes == 4096

    def test_settings_are_frozen(self) -> None:
        settings = full_settings()

        with pytest.raises(ValidationError, match="frozen"):
            settings.project_name = "changed"


class TestSecrets:
    @pytest.fixture
    def settings(self, monkeypatch: pytest.MonkeyPatch) -> Settings:
        monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
        monkeypatch.setenv("LLM_API_KEY", OTHER_KEY)
        return full_settings()

    def test_keys_are_secret_strings(self, settings: Settings) -> None:
        assert isinstance(settings.llm.groq_api_key, SecretStr)
        assert isinstance(settings.llm.api_key, SecretStr)
        assert settings.llm.api_key.get_secret_value() == OTHER_KEY

    def test_repr_shows_no_key(self, settings: Settings) -> None:
        text = repr(settings) + str(settings) + repr(settings.llm.resolve())

        assert GROQ_KEY not in text
        assert OTHER_KEY not in text

    def test_json_dump_shows_no_key(self, settings: Settings) -> None:
        dumped = settings.model_dump_json()

        assert GROQ_KEY not in dumped
        assert OTHER_KEY not in dumped
        assert "**********" in dumped
