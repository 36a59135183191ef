"""The processes a run starts: the fake LLM, the app, the raw-asyncpg reference and the load
generator. Every one is started by this module, logs to `bench/results/logs/`, dies with the
orchestrator (PR_SET_PDEATHSIG) and is stopped by its own pid: SIGTERM, then SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bench.client import fetch
from bench.procstat import descendants

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "bench" / "results" / "logs"
PYTHON = sys.executable
STARTUP_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# Settings the app reads from the environment: only the bench's own values may reach it.
_APP_PREFIXES = (
    "LLM_",
    "DB_",
    "DATABASE_URL",
    "GROQ_",
    "AUTH_",
    "LIMITS_",
    "RATE_LIMIT_",
    "REDIS_URL",
    "MAX_",
    "LOG_LEVEL",
    "CONVERSATION_",
    "STREAM_",
    "IDEMPOTENCY_",
    "SHUTDOWN_",
    "ENVIRONMENT",
    "APP_ENV",
)


def clean_environ() -> dict[str, str]:
    """The environment of every process the bench starts. `BENCH_APP_SRC` (`--app-src`) names
    a directory whose `chatbot_api` shadows the installed one: a snapshot of another commit,
    to compare two versions of the app on the same machine in the same run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_APP_PREFIXES)}
    paths = [os.environ.get("BENCH_APP_SRC", ""), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _log_file(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    port: int = 0
    log: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """This process and its children (uvicorn workers)."""
        return descendants(self.pid)

    async def stop(self, grace: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class Registry:
    """Every process of the run, so that all of them are stopped however the run ends."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    async def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int = 0
    ) -> Proc:
        log = LOGS / f"{name}.log"
        full_env = clean_environ() | (env or {})
        with _log_file(log) as out:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=full_env,
                # Not the repo root: a developer's `.env` there must not reconfigure the app.
                cwd=LOGS,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, process, port, log)
        self.procs.append(proc)
        return proc

    async def stop(self, proc: Proc) -> None:
        await proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()
        self.procs.clear()


async def wait_http(proc: Proc, path: str, within: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.process.returncode is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}: see {proc.log}")
        try:
            response = await fetch(proc.port, "GET", path, within=2.0)
            if response.status == 200:
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer GET {path} within {within:g}s")


@dataclass(frozen=True)
class FakeConfig:
    """The fake LLM's script: time to first token, deltas, pacing, non-streaming delay."""

    ttft: float = 0.0
    tokens: int | None = None
    token_delay: float = 0.0
    nonstream_delay: float = 0.0

    def argv(self) -> list[str]:
        out = ["--ttft", str(self.ttft), "--token-delay", str(self.token_delay)]
        out += ["--nonstream-delay", str(self.nonstream_delay)]
        return out + ([] if self.tokens is None else ["--tokens", str(self.tokens)])

    def describe(self) -> str:
        tokens = "default reply (10 words)" if self.tokens is None else f"{self.tokens} deltas"
        return f"ttft {self.ttft:g}s, {tokens}, {self.token_delay * 1000:g} ms/delta"


async def start_fake(reg: Registry, name: str, config: FakeConfig) -> Proc:
    port = free_port()
    argv = [PYTHON, "-m", "chatbot_api.testing.fake_llm", "--port", str(port), *config.argv()]
    proc = await reg.spawn(name, argv, port=port)
    proc.info = {"fake": config.describe()}
    await wait_http(proc, "/v1/models")
    return proc


@dataclass(frozen=True)
class AppConfig:
    database_url: str
    fake_url: str | None = None
    workers: int = 1
    pool_size: int = 10
    max_overflow: int = 0
    env: tuple[tuple[str, str], ...] = ()

    def environ(self) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.database_url,
            "DB_POOL_SIZE": str(self.pool_size),
            "DB_MAX_OVERFLOW": str(self.max_overflow),
            # The suite sends no key unless given one (--bearer); unknown settings are ignored.
            "AUTH_MODE": "disabled",
            # Per-key limits stay on (their checks are part of the request path) but far
            # above what the bench sends: it measures the server, not the limiter's refusals.
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000000",
            "RATE_LIMIT_CONCURRENT_STREAMS": "1000000",
            "RATE_LIMIT_TOKENS_PER_DAY": "1000000000000",
            # Access logs off: the bench measures the request path, not log formatting.
            "LOG_LEVEL": "WARNING",
            "ENVIRONMENT": "development",
        }
        if self.fake_url is not None:
            env |= {
                "LLM_PROVIDER": "openai",
                "LLM_BASE_URL": self.fake_url,
                "LLM_API_KEY": "x",
                "LLM_MODEL": "fake",
            }
        return env | dict(self.env)


async def start_app(reg: Registry, name: str, config: AppConfig) -> Proc:
    port = free_port()
    argv = [PYTHON, "-m", "chatbot_api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(config.workers), "--no-migrate"]
    proc = await reg.spawn(name, argv, env=config.environ(), port=port)
    await wait_http(proc, "/health")
    if config.workers > 1:
        # uvicorn's supervisor answers before every worker has started: wait for them all.
        for _ in range(int(STARTUP_TIMEOUT * 10)):
            if len(proc.pids()) >= config.workers + 1:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
    proc.info = {"workers": config.workers, "pool": f"{config.pool_size}+{config.max_overflow}"}
    return proc


async def start_reference(reg: Registry, name: str, database_url: str, fake_url: str) -> Proc:
    port = free_port()
    argv = [PYTHON, "-m", "bench.reference_app", "--port", str(port)]
    argv += ["--database-url", database_url, "--llm-url", fake_url, "--pool-size", "10"]
    proc = await reg.spawn(name, argv, port=port)
    await wait_http(proc, "/health")
    return proc


class LoadGen:
    """The load-generator process: one job at a time, JSON lines over pipes."""

    def __init__(self, reg: Registry) -> None:
        self._reg = reg
        self.proc: Proc | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        with _log_file(LOGS / "loadgen.log") as err:
            process = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.loadgen",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                limit=256 * 1024 * 1024,
                preexec_fn=_die_with_parent,
            )
        self.proc = Proc("loadgen", process)
        self._reg.procs.append(self.proc)

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None
        process = self.proc.process
        assert process.stdin is not None
        assert process.stdout is not None
        async with self._lock:
            process.stdin.write(json.dumps(job).encode() + b"\n")
            await process.stdin.drain()
            line = await asyncio.wait_for(
                process.stdout.readline(), float(job.get("deadline_s", 300)) + 60
            )
        if not line:
            raise RuntimeError("the load generator exited: see bench/results/logs/loadgen.log")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"load generator: {result['error']}")
        return result
