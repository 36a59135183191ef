"""S5. Cost bounded by the context window, not by conversation length: a turn in a
10,000-message conversation costs <= 1.2x a turn in one whose history just fills the model's
context window, in server CPU and in p50; with the default window (128k tokens) and with a
small one (LLM_CONTEXT_WINDOW=4096).

Conversations are seeded with a fixed token count per message, so "just fills" is computed
exactly as the app budgets: window - reply room - system prompt - new message - overheads.
Each window has its own app process (one worker); long and window-filling conversations are
interleaved A/B/A/B in closed-loop phases of fixed counts. The prompt sizes the fake LLM
reports are recorded to show both kinds of turn sent a full window.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bench.common import DEFAULT_SYSTEM, Bench, Job, completed_usage, interleave, send
from bench.results import Target, fmt, merge, pct_ms
from bench.seed import analyze, dsn
from bench.servers import FakeConfig, Proc

TOKENS = 24  # stored token_count of every seeded message
WORDS = (17, 19)
PER_MESSAGE, PROMPT_OVERHEAD, REPLY = 4, 8, 1024
LONG = 10_000
TEXT = "Given everything above, what should we change first?"


def fill_count(window: int, count: Any) -> int:
    """Messages whose history just fits the window (97% of it: the estimate of the new
    message's tokens may drift a little as the app calibrates against the fake's usage)."""
    reply = min(REPLY, window // 2)
    fixed = PROMPT_OVERHEAD + count(DEFAULT_SYSTEM) + PER_MESSAGE + count(TEXT) + 8 + PER_MESSAGE
    room = window - reply - fixed
    return int(room * 0.97) // (TOKENS + PER_MESSAGE)


async def compare(
    b: Bench, app: Proc, long_ids: list[str], fill_ids: list[str], count: int, conc: int
) -> dict[str, list[Job]]:
    def phase(ids: list[str]) -> Any:
        async def go() -> Job:
            spec = send(app, ids, message=TEXT, count=count, concurrency=conc, capture=1)
            return await b.job([spec], cpu={"app": app})

        return go

    await b.job([send(app, long_ids + fill_ids, message=TEXT, count=10, concurrency=2)])
    return await interleave(b.n(2, 1), {"fill": phase(fill_ids), "long": phase(long_ids)})


def summarise(b: Bench, label: str, jobs: dict[str, list[Job]], sizes: dict[str, int]) -> None:
    out: dict[str, dict[str, float]] = {}
    for kind in ("fill", "long"):
        ok = sum(j.part()["ok"] for j in jobs[kind])
        cpu = sum(j.cpu("app") for j in jobs[kind]) / max(1, ok) * 1e6
        p50 = pct_ms(merge([j.part()["latency"] for j in jobs[kind]]), 50)
        prompts = [
            (completed_usage(c["body"]) or {}).get("prompt_tokens", 0)
            for j in jobs[kind]
            for c in j.part().get("captured", [])
        ]
        out[kind] = {"cpu_us": cpu, "p50_ms": p50, "prompt_tokens": max(prompts, default=0)}
    for metric, unit in (("cpu_us", "server CPU"), ("p50_ms", "p50")):
        ratio = out["long"][metric] / out["fill"][metric]
        note = (
            f"{LONG:,} messages: {fmt(out['long'][metric])} vs window-filling "
            f"({sizes['fill']:,} messages): {fmt(out['fill'][metric])} "
            f"{'us' if metric == 'cpu_us' else 'ms'}; prompts {out['long']['prompt_tokens']:,} vs "
            f"{out['fill']['prompt_tokens']:,} tokens (fake's count)"
        )
        b.results.add(Target(5, f"{unit} long/fill, {label}", ratio, "x", "<=", 1.2, note))
    rows = []
    for kind in ("fill", "long"):
        for r, j in enumerate(jobs[kind], 1):
            p = j.part()
            rows.append(
                {
                    "phase": f"{kind} r{r}",
                    "ok/sent": f"{p['ok']}/{p['sent']}",
                    "server CPU/turn us": j.cpu_per_ok_us("app"),
                    "p50 ms": p["latency"].get("p50", 0) / 1000,
                    "p99 ms": p["latency"].get("p99", 0) / 1000,
                    "loadgen cores": j.loadgen_cores,
                    "machine busy cores": j.machine_cores,
                }
            )
    b.results.detail(5, f"{label} phases", rows)


async def run(b: Bench) -> None:
    assert b.seeder is not None
    from chatbot_api.llm.tokens import TokenEstimator

    count = TokenEstimator().count
    sizes = {"4k": fill_count(4096, count), "128k": fill_count(128_000, count)}
    conn = await asyncpg.connect(dsn(b.db))
    try:
        seed = b.seeder.insert
        long_ids = await seed(conn, b.n(6, 3), LONG, words=WORDS, tokens=TOKENS)
        fill4 = await seed(conn, b.n(100, 30), sizes["4k"], words=WORDS, tokens=TOKENS)
        fill128 = await seed(conn, b.n(6, 3), sizes["128k"], words=WORDS, tokens=TOKENS)
        await analyze(conn)
    finally:
        await conn.close()
    b.results.detail(
        5,
        "seeded",
        f"{len(long_ids)} conversations of {LONG:,} messages; window-filling: "
        f"{len(fill4)} of {sizes['4k']} (4k window), {len(fill128)} of {sizes['128k']:,} "
        f"(128k window); {TOKENS} tokens per message",
    )
    async with b.scope() as reg:
        fake = await b.fake(reg, "s5-fake", FakeConfig())
        app4 = await b.app(reg, "s5-app-4k", fake, env={"LLM_CONTEXT_WINDOW": "4096"})
        app128 = await b.app(reg, "s5-app-128k", fake)
        jobs4 = await compare(b, app4, long_ids, fill4, b.n(400, 100), 4)
        summarise(b, "4k window", jobs4, {"fill": sizes["4k"]})
        jobs128 = await compare(b, app128, long_ids, fill128, b.n(40, 8), 2)
        summarise(b, "128k window", jobs128, {"fill": sizes["128k"]})
