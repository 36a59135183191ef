"""What every scenario shares: the run's context (`Bench`), builders for load-generator parts,
and the wrapper around a finished job (`Job`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.results import LOADGEN_LIMIT, Results
from bench.seed import Seeder, app_url
from bench.servers import AppConfig, FakeConfig, LoadGen, Proc, Registry, start_app, start_fake
from chatbot_api.config import DatabaseSettings

DEFAULT_SYSTEM = (
    "You are a helpful, concise assistant. Always answer in the language the user writes in."
)
MESSAGE = "Can you explain how the context window limits what the model remembers?"
# The app's own per-process pool (`DatabaseSettings`), for the scenarios that run it as deployed.
DEFAULT_POOL: tuple[int, int] = (
    DatabaseSettings.model_fields["pool_size"].default,
    DatabaseSettings.model_fields["max_overflow"].default,
)


@dataclass
class Job:
    """A finished load-generator job."""

    raw: dict[str, Any]

    def part(self, i: int = 0) -> dict[str, Any]:
        part: dict[str, Any] = self.raw["parts"][i]
        return part

    @property
    def loadgen_cores(self) -> float:
        return float(self.raw["loadgen_cores"])

    @property
    def machine_cores(self) -> float:
        return float(self.raw.get("machine_busy_cores", float("nan")))

    def cpu(self, group: str) -> float:
        return float(self.raw["server_cpu_s"].get(group, 0.0))

    def cpu_per_ok_us(self, group: str, i: int = 0) -> float:
        ok = self.part(i)["ok"]
        return self.cpu(group) / ok * 1e6 if ok else float("nan")


def invalid(jobs: list[Job]) -> str:
    worst = max((j.loadgen_cores for j in jobs), default=0.0)
    return f"load generator at {worst:.0%} of a core" if worst > LOADGEN_LIMIT else ""


@dataclass
class Bench:
    reg: Registry
    gen: LoadGen
    results: Results
    quick: bool
    db: str
    conversations: list[str] = field(default_factory=list)
    seeder: Seeder | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    bearer: str | None = None
    # Settings given to every app process (`--app-env`), for what-if runs.
    app_env: dict[str, str] = field(default_factory=dict)

    def n(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[Registry]:
        """Processes started inside are stopped on the way out, whatever happens."""
        reg = Registry()
        try:
            yield reg
        finally:
            await reg.stop_all()

    async def fake(self, reg: Registry, name: str, config: FakeConfig) -> Proc:
        return await start_fake(reg, name, config)

    async def app(
        self,
        reg: Registry,
        name: str,
        fake: Proc | None,
        *,
        workers: int = 1,
        pool: tuple[int, int] = (10, 0),
        env: dict[str, str] | None = None,
    ) -> Proc:
        config = AppConfig(
            database_url=app_url(self.db),
            fake_url=None if fake is None else f"http://127.0.0.1:{fake.port}/v1",
            workers=workers,
            pool_size=pool[0],
            max_overflow=pool[1],
            env=tuple((self.app_env | (env or {})).items()),
        )
        return await start_app(reg, name, config)

    async def job(
        self, parts: list[dict[str, Any]], cpu: dict[str, Proc] | None = None, deadline: float = 300
    ) -> Job:
        for part in parts:
            part.setdefault("bearer", self.bearer)
        spec = {
            "parts": parts,
            "deadline_s": deadline,
            "cpu_pids": {name: proc.pids() for name, proc in (cpu or {}).items()},
        }
        return Job(await self.gen.run(spec))

    async def warm(self, app: Proc, count: int = 300, stream: bool = False) -> None:
        """Fill the pools and caches before anything is measured."""
        await self.job([send(app, self.conversations, count=count, concurrency=8, stream=stream)])


def part(
    name: str,
    port: int,
    request: dict[str, Any],
    *,
    count: int,
    concurrency: int,
    rate: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "port": port,
        "request": request,
        "count": count,
        "concurrency": concurrency,
        "mode": "closed" if rate is None else "open",
    }
    if rate is not None:
        spec["rate"] = rate
    return spec | extra


def send(
    app: Proc, conversations: list[str], *, stream: bool = False, message: str = MESSAGE, **kw: Any
) -> dict[str, Any]:
    request = {"kind": "send", "stream": stream, "message": message}
    return part(app.name, app.port, request, conversations=conversations, **kw)


def create(app: Proc, **kw: Any) -> dict[str, Any]:
    return part(app.name, app.port, {"kind": "create"}, **kw)


def direct(fake: Proc, history: int = 10, **kw: Any) -> dict[str, Any]:
    """The chat-completions request the app sends for a turn, straight to the fake LLM."""
    return part(
        f"{fake.name} direct", fake.port, {"kind": "direct", "payload": payload(history)}, **kw
    )


def get(proc: Proc, path: str, **kw: Any) -> dict[str, Any]:
    return part(f"{proc.name} GET {path}", proc.port, {"kind": "get", "path": path}, **kw)


def payload(history: int) -> dict[str, Any]:
    words = "the model answers questions about python services and database latency".split()
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(words[: 8 + i % 5])}
        for i in range(history)
    ]
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *turns]
    messages.append({"role": "user", "content": MESSAGE})
    return {
        "model": "fake",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 1024,
    }


async def interleave(
    rounds: int, phases: dict[str, Callable[[], Awaitable[Job]]]
) -> dict[str, list[Job]]:
    """A/B/A/B: every round runs each phase once, in the same order."""
    out: dict[str, list[Job]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, run in phases.items():
            out[name].append(await run())
    return out


def completed_usage(body: str) -> dict[str, Any] | None:
    """The `usage` of a captured response: the JSON reply, or the SSE `message.completed`."""
    for block in body.split("\n\n"):
        if "event: message.completed" in block:
            for line in block.splitlines():
                if line.startswith("data: "):
                    usage: dict[str, Any] | None = json.loads(line[6:]).get("usage")
                    return usage
    with contextlib.suppress(ValueError):
        found: dict[str, Any] | None = json.loads(body).get("usage")
        return found
    return None
