"""S7. Embedded model: tokens/s through the API >= 0.95x llama-cpp-python called directly on
the same prompt, in the same run (LLM_PROVIDER=local). Health checks answer in <= 5 ms p99
while it generates.

The baseline is `bench/local_direct.py`: the same GGUF, context size, threads, chat template
and sampling, greedy on both sides (LLM_TEMPERATURE=0), so both generate the same tokens.
Decoding speed is compared: (tokens - 1) / (time of last token - time of first token), the
API's times taken by the client as the SSE deltas arrive. Each generation through the API
runs in a fresh conversation, so both prompts are [default system prompt, user message].
Phases alternate A/B/A/B; while the API generates, GET /health is sent at 50/s (open loop).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bench.client import fetch
from bench.common import DEFAULT_SYSTEM, Bench, completed_usage, get, send
from bench.results import Target, merge, pct_ms
from bench.servers import LOGS, PYTHON, ROOT, Proc, _die_with_parent, _log_file, clean_environ

PROMPT = "Write a short story about a robot who learns to paint. Describe every painting."


class Direct:
    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> dict[str, Any]:
        with _log_file(LOGS / "s7-direct.log") as err:
            self.process = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.local_direct",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=clean_environ(),
                preexec_fn=_die_with_parent,
            )
        return await self._read(120)

    async def _read(self, within: float) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise RuntimeError("local_direct exited: see bench/results/logs/s7-direct.log")
        result: dict[str, Any] = json.loads(line)
        return result

    async def generate(self, max_tokens: int) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None
        messages = [
            {"role": "system", "content": DEFAULT_SYSTEM},
            {"role": "user", "content": PROMPT},
        ]
        request = {"messages": messages, "max_tokens": max_tokens}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        await self.process.stdin.drain()
        return await self._read(300)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def api_phase(b: Bench, app: Proc, k: int, health_seconds: float) -> dict[str, Any]:
    ids = []
    for _ in range(k):
        created = await fetch(app.port, "POST", "/api/v1/conversations", {}, bearer=b.bearer)
        ids.append(created.json()["id"])
    parts = [
        send(
            app, ids, stream=True, message=PROMPT, count=k, concurrency=1, capture=k, timeout_s=300
        )
    ]
    if health_seconds > 0:
        parts.append(get(app, "/health", rate=50, count=int(50 * health_seconds), concurrency=8))
    job = await b.job(parts, cpu={"app": app}, deadline=600)
    gens = []
    for c in job.part(0).get("captured", []):
        usage = completed_usage(c["body"]) or {}
        gens.append(
            {
                "tokens": usage.get("completion_tokens", c["deltas"]),
                "first": c["first"],
                "last": c["last"],
            }
        )
    return {
        "gens": gens,
        "health": job.part(1)["latency"] if health_seconds > 0 else None,
        "job": job,
    }


def rate(gens: list[dict[str, Any]]) -> tuple[float, int]:
    tokens = sum(g["tokens"] - 1 for g in gens if g["first"] is not None)
    seconds = sum(g["last"] - g["first"] for g in gens if g["first"] is not None)
    return tokens / seconds if seconds > 0 else float("nan"), sum(g["tokens"] for g in gens)


async def run(b: Bench) -> None:
    max_tokens = b.n(128, 48)
    k = b.n(3, 2)
    direct = Direct()
    env = {"LLM_PROVIDER": "local", "LLM_TEMPERATURE": "0", "LLM_MAX_TOKENS": str(max_tokens)}
    try:
        info = await direct.start()
        async with b.scope() as reg:
            app = await b.app(reg, "s7-app-local", None, env=env)
            warm_api = await api_phase(b, app, 1, 0)
            warm_direct = await direct.generate(max_tokens)
            one = warm_api["gens"][0]
            per_gen = one["last"] - one["first"] if one["first"] else 2.0
            quiet = (await b.job([get(app, "/health", rate=50, count=150, concurrency=8)])).part()
            d_gens: list[dict[str, Any]] = []
            a_gens: list[dict[str, Any]] = []
            health = []
            for _ in range(b.n(2, 1)):
                for _ in range(k):
                    d_gens.append(await direct.generate(max_tokens))
                phase = await api_phase(b, app, k, per_gen * k * 0.9)
                a_gens += phase["gens"]
                health.append(phase["health"])
    finally:
        await direct.stop()
    api_tps, api_tokens = rate(a_gens)
    direct_tps, direct_tokens = rate(d_gens)
    note = (
        f"API {api_tps:.1f} tok/s vs direct {direct_tps:.1f} tok/s; {api_tokens} vs "
        f"{direct_tokens} tokens in {len(a_gens)} generations each; "
        f"{info.get('threads')} thread(s), n_ctx {info.get('n_ctx')}"
    )
    b.results.add(
        Target(7, "API tokens/s vs llama-cpp direct", api_tps / direct_tps, "x", ">=", 0.95, note)
    )
    h = merge([x for x in health if x])
    note = (
        f"{h.get_total_count()} checks at 50/s during generation; idle: p99 "
        f"{quiet['latency'].get('p99', 0) / 1000:.2f} ms"
    )
    b.results.add(Target(7, "health p99 while generating", pct_ms(h, 99), "ms", "<=", 5, note))
    b.results.detail(
        7,
        "warm-up generation",
        f"API {one['tokens']} tokens; direct {warm_direct['tokens']} tokens",
    )
