"""S1. In-flight capacity: 1,000 concurrent non-streaming chats, 2 s fake LLM, DB pool 10, one
process. Throughput >= 450 req/s, p99 <= 2.3 s, 0 pool timeouts, and no `idle in
transaction` session during the LLM wait.

Closed loop with 1,000 connections, each sending its next chat when the last one answered;
the workers' first sends are spread over one LLM latency so that arrivals are steady. The
baseline is the same load sent straight to the fake LLM (A/B/A/B). Throughput is counted in
the steady window (after the ramp-up, before the ramp-down). pg_stat_activity is sampled
every 100 ms: a session idle in a transaction for longer than half the LLM latency can only
be one that holds its connection across the LLM call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from bench.common import Bench, Job, direct, interleave, invalid, send
from bench.results import Target, merge, pct_ms
from bench.seed import dsn, idle_in_transaction
from bench.servers import FakeConfig

LLM_SECONDS = 2.0


def steady_rps(job: Job, margin: float) -> float:
    part = job.part()
    times = sorted(part.get("completions", []))
    if not times:
        return 0.0
    start, end = part["start"] + margin, part["end"] - margin
    if end - start < 1.0:
        return len(times) / max(1e-9, part["end"] - part["start"])
    return sum(start <= t <= end for t in times) / (end - start)


async def watch_sessions(db: str, out: dict[str, Any], stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(dsn(db))
    try:
        for _ in range(3000):  # at most 5 minutes of samples
            try:
                iit, held, longest = await idle_in_transaction(conn, db, LLM_SECONDS / 2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # PostgreSQL went away (someone restarted it): reconnect, and say so.
                out["watcher reconnects"] = out.get("watcher reconnects", 0) + 1
                await asyncio.sleep(0.5)
                with contextlib.suppress(OSError, asyncpg.PostgresError):
                    conn = await asyncpg.connect(dsn(db))
                continue
            out["samples"] += 1
            out["max idle-in-transaction sessions"] = max(
                out["max idle-in-transaction sessions"], iit
            )
            out["held > 1 s"] = max(out["held > 1 s"], held)
            out["longest idle in transaction s"] = max(
                out["longest idle in transaction s"], longest
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            if stop.is_set():
                return
    finally:
        await conn.close()


async def run(b: Bench) -> None:
    concurrency = b.n(1000, 200)
    per_worker = b.n(6, 2)
    rounds = b.n(2, 1)
    sessions = {
        "samples": 0,
        "max idle-in-transaction sessions": 0,
        "held > 1 s": 0,
        "longest idle in transaction s": 0.0,
    }
    async with b.scope() as reg:
        fake = await b.fake(
            reg, "s1-fake", FakeConfig(ttft=LLM_SECONDS, nonstream_delay=LLM_SECONDS)
        )
        app = await b.app(reg, "s1-app", fake, pool=(10, 0))
        await b.warm(app, count=b.n(200, 100))
        common = {
            "count": concurrency * per_worker,
            "concurrency": concurrency,
            "stagger_s": LLM_SECONDS,
            "completions": True,
            "timeout_s": 30.0,
            "duration_s": b.n(30, 8),
        }

        async def run_direct() -> Job:
            return await b.job([direct(fake, **common)], cpu={"fake": fake}, deadline=120)

        async def run_app() -> Job:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_sessions(b.db, sessions, stop))
            try:
                spec = send(app, b.conversations, **common)
                return await b.job([spec], cpu={"app": app, "fake": fake}, deadline=120)
            finally:
                stop.set()
                await watcher

        jobs = await interleave(rounds, {"direct": run_direct, "app": run_app})

    margin = LLM_SECONDS + 1.0
    app_rps = sum(steady_rps(j, margin) for j in jobs["app"]) / rounds
    direct_rps = sum(steady_rps(j, margin) for j in jobs["direct"]) / rounds
    lat = merge([j.part()["latency"] for j in jobs["app"]])
    base = merge([j.part()["latency"] for j in jobs["direct"]])
    p99, base_p99 = pct_ms(lat, 99) / 1000, pct_ms(base, 99) / 1000
    timeouts = sum(j.part()["codes"].get("database_unavailable", 0) for j in jobs["app"])
    failed = sum(j.part()["sent"] - j.part()["ok"] for j in jobs["app"])
    flag = invalid(jobs["app"] + jobs["direct"])
    cpu = sum(j.cpu("app") for j in jobs["app"]) / max(1, sum(j.part()["ok"] for j in jobs["app"]))
    note = (
        f"{concurrency} concurrent, 1 worker, pool 10+0; direct to the fake: {direct_rps:.0f} req/s"
    )
    b.results.add(Target(1, "throughput (steady)", app_rps, "req/s", ">=", 450, note, flag))
    sent = sum(j.part()["sent"] for j in jobs["app"])
    note = f"direct to the fake: p99 {base_p99:.3f} s; {failed} failed of {sent}"
    b.results.add(Target(1, "p99 latency", p99, "s", "<=", 2.3, note, flag))
    b.results.add(Target(1, "pool timeouts", timeouts, "", "<=", 0, "503 database_unavailable"))
    note = (
        f"{sessions['samples']} samples of pg_stat_activity; at most "
        f"{sessions['max idle-in-transaction sessions']} sessions idle in a transaction at once, "
        f"the longest for {sessions['longest idle in transaction s']:.3f} s"
    )
    b.results.add(
        Target(1, "sessions idle in transaction > 1 s", sessions["held > 1 s"], "", "<=", 0, note)
    )
    rows = []
    for label in ("direct", "app"):
        for r, j in enumerate(jobs[label], 1):
            part = j.part()
            rows.append(
                {
                    "phase": f"{label} r{r}",
                    "ok/sent": f"{part['ok']}/{part['sent']}",
                    "steady req/s": steady_rps(j, margin),
                    "overall req/s": part["rps"],
                    "p50 s": part["latency"].get("p50", 0) / 1e6,
                    "p99 s": part["latency"].get("p99", 0) / 1e6,
                    "max s": part["latency"].get("max", 0) / 1e6,
                    "server CPU/req us": j.cpu_per_ok_us("app") if label == "app" else float("nan"),
                    "loadgen cores": j.loadgen_cores,
                    "machine busy cores": j.machine_cores,
                    "errors": {**part["codes"], **part["errors"]} or "",
                }
            )
    b.results.detail(1, "phases", rows)
    b.results.detail(1, "server CPU per chat", f"{cpu * 1e6:.0f} us")
    b.results.detail(1, "pg_stat_activity", sessions)
    b.results.detail(
        1, "fake LLM", f"time to first token {LLM_SECONDS:g} s (streamed: the app streams)"
    )
    b.results.detail(1, "measured at", time.strftime("%H:%M:%S"))
