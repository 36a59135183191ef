"""The `chatbot-api` command: `migrate` as a real process, the `serve` arguments, and the
installed console script."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot_api.cli import _max_connections, build_parser, connection_budget_warning

VENV_BIN = Path(sys.executable).parent


def run(args: list[str], *, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run with a clean copy of the environment: none of our variables leak in, and `cwd`
    holds no `.env`."""
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LLM_", "DB_")) and name not in {"DATABASE_URL", "GROQ_API_KEY"}
    }
    return subprocess.run(
        args,
        cwd=cwd,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def migrate(cwd: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, "-m", "chatbot_api.cli", "migrate"], cwd=cwd, DATABASE_URL=database_url
    )


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


class TestMigrateCommand:
    def test_creates_the_schema_and_exits_zero(self, tmp_path: Path) -> None:
        path = tmp_path / "cli.db"

        result = migrate(tmp_path, f"sqlite+aiosqlite:///{path}")

        assert result.returncode == 0, result.stderr
        assert {"conversations", "messages", "alembic_version"} <= tables(path)
        assert "database schema is up to date" in result.stderr

    def test_accepts_a_plain_sqlite_url(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.db"

        result = migrate(tmp_path, f"sqlite:///{path}")

        assert result.returncode == 0, result.stderr
        assert {"conversations", "messages"} <= tables(path)

    def test_running_twice_keeps_one_version_row(self, tmp_path: Path) -> None:
        path = tmp_path / "twice.db"
        url = f"sqlite+aiosqlite:///{path}"

        first, second = migrate(tmp_path, url), migrate(tmp_path, url)

        assert (first.returncode, second.returncode) == (0, 0), second.stderr
        with sqlite3.connect(path) as connection:
            versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        assert len(versions) == 1

    def test_unreachable_database_exits_non_zero(self, tmp_path: Path) -> None:
        result = migrate(tmp_path, "postgresql://postgres@127.0.0.1:1/nowhere")

        assert result.returncode != 0
        assert "database schema is up to date" not in result.stderr


class TestParser:
    def test_serve_options_are_parsed(self) -> None:
        args = build_parser().parse_args(
            ["serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "2", "--no-migrate"]
        )

        assert args.command == "serve"
        assert args.host == "0.0.0.0"
        assert args.port == 9000
        assert args.workers == 2
        assert args.migrate is False

    def test_serve_defaults(self) -> None:
        args = build_parser().parse_args(["serve"])

        assert args.migrate is True
        assert args.workers is None
        assert (args.host, args.port) == ("127.0.0.1", 8000)
        assert args.proxy_headers is False

    def test_migrate_takes_no_options(self) -> None:
        args = build_parser().parse_args(["migrate"])

        assert args.command == "migrate"

    def test_a_command_is_required(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([])

        assert exit_info.value.code == 2
        assert "command" in capsys.readouterr().err

    def test_port_must_be_a_number(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--port", "eighty"])

        assert "--port" in capsys.readouterr().err


class TestConsoleScript:
    def test_is_installed_and_prints_help(self, tmp_path: Path) -> None:
        script = VENV_BIN / "chatbot-api"

        result = run([str(script), "--help"], cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert "serve" in result.stdout
        assert "migrate" in result.stdout


class TestConnectionBudget:
    def test_pools_within_max_connections_are_fine(self) -> None:
        assert connection_budget_warning(100, workers=2, pool_size=5, max_overflow=5) is None
        assert connection_budget_warning(25, workers=2, pool_size=5, max_overflow=5) is None

    def test_pools_over_max_connections_are_reported_with_a_size_that_fits(self) -> None:
        warning = connection_budget_warning(100, workers=8, pool_size=10, max_overflow=5)

        assert warning is not None
        assert "120 connections" in warning
        assert "to 11 per worker" in warning

    def test_serve_warns_against_the_live_max_connections(self, postgres_url: str) -> None:
        limit = asyncio.run(_max_connections(postgres_url, 5.0))
        assert limit is not None
        assert limit >= 10

        warning = connection_budget_warning(limit, workers=limit, pool_size=1, max_overflow=0)

        assert warning is not None
        assert f"allows {limit}" in warning
        assert asyncio.run(_max_connections(unreachable_postgres(), 1.0)) is None


def unreachable_postgres() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nothing"
