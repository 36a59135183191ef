"""Docker cannot run on the build machine, so these tests keep the Dockerfile, the compose
file and .env.example in step with the CLI, the settings and the routes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from chatbot_api.cli import build_parser
from chatbot_api.config import Settings
from chatbot_api.main import create_app

ROOT = Path(__file__).resolve().parent.parent


def _env_names(model: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class (and its nested groups) reads."""
    prefix = str(model.model_config.get("env_prefix", "")).upper()
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= _env_names(annotation)
            continue
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(prefix + name.upper())
    return names


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _route_paths() -> set[str]:
    return set(create_app(Settings(_env_file=None)).openapi()["paths"])


class TestCompose:
    def test_api_waits_for_a_healthy_postgres_16(self) -> None:
        services = _compose()["services"]

        assert services["db"]["image"] == "postgres:16"
        assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
        assert services["web"]["depends_on"]["db"]["condition"] == "service_healthy"

    def test_api_command_is_a_valid_cli_invocation_that_migrates(self) -> None:
        command = _compose()["services"]["web"]["command"]

        assert command[0] == "chatbot-api"
        args = build_parser().parse_args(command[1:])
        assert args.command == "serve"
        assert args.migrate is True
        assert args.host == "0.0.0.0"

    def test_environment_names_are_real_settings(self) -> None:
        web = _compose()["services"]["web"]
        known = _env_names(Settings)

        assert set(web["environment"]) <= known
        assert web["environment"]["DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert web["env_file"][0]["path"] == ".env"

    def test_compiles_llama_cpp_with_the_makefiles_portable_flags(self) -> None:
        # A native build (`-march=native`) crashed on a Xeon with AVX-512 and AMX, and an image
        # built on one host must run on another: both builds use the same baseline flags.
        make = re.search(r"^LLAMA_CMAKE_ARGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
        docker = re.search(r'^ARG LLAMA_CMAKE_ARGS="(.+)"$', _dockerfile(), re.MULTILINE)
        assert make is not None
        assert docker is not None
        assert make.group(1) == docker.group(1)
        assert "-DGGML_NATIVE=OFF" in make.group(1).split()
        assert """CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip install '.[local]'""" in _dockerfile()

    def test_healthcheck_probes_the_readiness_route(self) -> None:
        test = " ".join(_compose()["services"]["web"]["healthcheck"]["test"])

        path = re.search(r"http://127\.0\.0\.1:8000(/[\w/]+)", test)
        assert path is not None
        assert path.group(1) in _route_paths()


class TestDockerfile:
    def test_is_multi_stage_slim_and_non_root(self) -> None:
        text = _dockerfile()

        stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert len(stages) >= 2
        assert all("slim" in image for image in stages)
        user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert user
        assert user[-1] not in {"root", "0"}

    def test_cmd_is_a_valid_cli_invocation(self) -> None:
        cmd = re.search(r"^CMD (\[.*\])$", _dockerfile(), re.MULTILINE)
        assert cmd is not None
        argv: list[str] = yaml.safe_load(cmd.group(1))

        assert argv[0] == "chatbot-api"
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.port) == ("serve", 8000)
        assert f"EXPOSE {args.port}" in _dockerfile()

    def test_healthcheck_probes_the_readiness_route(self) -> None:
        line = next(x for x in _dockerfile().splitlines() if 'CMD ["python"' in x)
        path = re.search(r"http://127\.0\.0\.1:8000(/[\w/]+)", line)
        assert path is not None
        assert path.group(1) in _route_paths()


class TestEnvExample:
    def test_every_variable_is_a_real_setting(self) -> None:
        known = _env_names(Settings)
        names = {
            shlex.split(line.lstrip("# "))[0].split("=")[0]
            for line in (ROOT / ".env.example").read_text().splitlines()
            if re.match(r"^#? ?[A-Z_]+=", line)
        }

        assert {"PROJECT_NAME", "GROQ_API_KEY", "DATABASE_URL"} <= names
        assert names <= known, names - known
