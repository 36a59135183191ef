"""S4. Throughput ceilings (closed loop, whole box): create conversation >= 2,500 req/s; send
message (zero-latency fake) >= 800 req/s; 200-token streams >= 150 streams/s.

The app runs as deployed on this box (two workers, the default on PostgreSQL, default pool),
with the fake LLM, PostgreSQL and the load generator sharing the same two cores. Each ceiling
is one closed-loop run of a fixed count, after a warm-up. Server CPU per request is reported
beside it: the ceiling is about 2 cores / (app + PostgreSQL + fake + generator CPU).
"""

from __future__ import annotations

from typing import Any

from bench.common import DEFAULT_POOL, Bench, Job, create, send
from bench.results import LOADGEN_LIMIT, Target
from bench.servers import FakeConfig

WORKERS = 2


def row(label: str, job: Job) -> dict[str, Any]:
    p = job.part()
    return {
        "phase": label,
        "ok/sent": f"{p['ok']}/{p['sent']}",
        "req/s": p["rps"],
        "p50 ms": p["latency"].get("p50", 0) / 1000,
        "p99 ms": p["latency"].get("p99", 0) / 1000,
        "app CPU/req us": job.cpu_per_ok_us("app"),
        "fake CPU/req us": job.cpu_per_ok_us("fake") if "fake" in job.raw["server_cpu_s"] else 0,
        "loadgen cores": job.loadgen_cores,
        "machine busy cores": job.machine_cores,
        "errors": {**p["codes"], **p["errors"]} or "",
    }


def flag(job: Job) -> str:
    cores = job.loadgen_cores
    return f"load generator at {cores:.0%} of a core" if cores > LOADGEN_LIMIT else ""


async def run(b: Bench) -> None:
    rows = []
    cap = b.n(20, 5)  # seconds: a slow app ends a run early rather than late
    async with b.scope() as reg:
        fake = await b.fake(reg, "s4-fake", FakeConfig())
        fake200 = await b.fake(reg, "s4-fake-200", FakeConfig(tokens=200))
        app = await b.app(reg, "s4-app", fake, workers=WORKERS, pool=DEFAULT_POOL)
        app200 = await b.app(reg, "s4-app-200", fake200, workers=WORKERS, pool=DEFAULT_POOL)
        await b.warm(app, count=b.n(1000, 300))
        await b.warm(app200, count=b.n(200, 50), stream=True)

        job = await b.job(
            [create(app, count=b.n(20_000, 3000), concurrency=64, duration_s=cap)], cpu={"app": app}
        )
        rows.append(row("create conversation", job))
        note = f"{WORKERS} workers; {job.cpu_per_ok_us('app'):.0f} us app CPU per request"
        b.results.add(
            Target(
                4, "create conversation", job.part()["rps"], "req/s", ">=", 2500, note, flag(job)
            )
        )

        spec = send(app, b.conversations, count=b.n(8000, 1500), concurrency=64, duration_s=cap)
        job = await b.job([spec], cpu={"app": app, "fake": fake})
        rows.append(row("send message", job))
        note = f"{WORKERS} workers; {job.cpu_per_ok_us('app'):.0f} us app CPU per turn"
        b.results.add(
            Target(4, "send message", job.part()["rps"], "req/s", ">=", 800, note, flag(job))
        )

        spec = send(
            app200,
            b.conversations,
            stream=True,
            count=b.n(1500, 300),
            concurrency=32,
            duration_s=cap,
        )
        job = await b.job([spec], cpu={"app": app200, "fake": fake200})
        rows.append(row("200-token streams", job))
        p = job.part()
        streams = p["streams_done"] / max(1e-9, p["wall_s"])
        note = f"{WORKERS} workers; {job.cpu_per_ok_us('app'):.0f} us app CPU per stream"
        b.results.add(
            Target(4, "200-token streams", streams, "streams/s", ">=", 150, note, flag(job))
        )
    b.results.detail(4, "runs", rows)
