"""S3. Streaming: 1,000 concurrent SSE streams at 20 tokens/s each on one process, app CPU
<= 0.6 core; added inter-token gap p99 <= 5 ms; added time to first token p50 <= 3 ms and
p99 <= 10 ms at 100 concurrent streams; server CPU <= 20 us per relayed token.

Two fake LLMs pace their deltas at 50 ms (20 tokens/s): a long reply for the 1,000-stream
phases and a 20-delta one for the time-to-first-token phases, each behind its own app
process (one worker, pool 10). Every phase is interleaved with the same load sent straight to
the fake (A/B/A/B). App CPU is averaged over the window in which all 1,000 streams are open
(each client runs two streams back to back, their starts spread over one stream's length).
CPU per relayed token is the marginal cost: CPU = a * streams + b * deltas solved over
100 concurrent streams of the short and of the long reply, so the per-turn cost (the
transactions, the upstream request) does not count as token cost, and an app overloaded by
1,000 streams does not charge its queueing to the tokens.
The long-stream app's RSS is sampled here too; S6 uses it for memory per open stream.

For information, the same run measures the floor of a relayed token on this stack: CPU per
delta of the app and of `bench/reference_app.py` (aiohttp in, raw ASGI out, no turn log, no
second task) over 300-delta streams (all-in: a turn's own cost is spread over them), with
deltas paced at 20 ms (one upstream read and one client write per delta) and unpaced (a fast
model: deltas arrive, and leave, several per write).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import Bench, Job, direct, interleave, invalid, send
from bench.procstat import Sampler
from bench.results import Target, merge, pct_ms
from bench.seed import dsn
from bench.servers import FakeConfig, Proc, start_reference

DELAY = 0.05
SHORT = 20


def stream_rows(label: str, jobs: list[Job], group: str | None) -> list[dict[str, Any]]:
    rows = []
    for r, j in enumerate(jobs, 1):
        p = j.part()
        rows.append(
            {
                "phase": f"{label} r{r}",
                "streams ok/sent": f"{p['streams_done']}/{p['sent']}",
                "deltas": p["deltas"],
                "ttft p50 ms": p["ttft"].get("p50", 0) / 1000,
                "ttft p99 ms": p["ttft"].get("p99", 0) / 1000,
                "gap p50 ms": p["gap"].get("p50", 0) / 1000,
                "gap p99 ms": p["gap"].get("p99", 0) / 1000,
                "server CPU/stream us": j.cpu_per_ok_us(group) if group else float("nan"),
                "loadgen cores": j.loadgen_cores,
                "machine busy cores": j.machine_cores,
                "errors": {**p["codes"], **p["errors"]} or "",
                "statuses": p["statuses"],
            }
        )
    return rows


def per_token_us(short: list[Job], long: list[Job]) -> tuple[float, float]:
    """Solve CPU = a * streams + b * deltas over the short and the long phases: b is the
    marginal CPU per relayed delta, a the per-stream cost. Streams are counted as sent and
    deltas as received, so streams cut short still count for the work they caused."""

    def totals(jobs: list[Job]) -> tuple[float, float, float]:
        streams = sum(j.part()["sent"] for j in jobs)
        deltas = sum(j.part()["deltas"] for j in jobs)
        return streams, deltas, sum(j.cpu("app") for j in jobs)

    s1, d1, c1 = totals(short)
    s2, d2, c2 = totals(long)
    det = s1 * d2 - s2 * d1
    if not det:
        return float("nan"), float("nan")
    a = (c1 * d2 - c2 * d1) / det
    b = (s1 * c2 - s2 * c1) / det
    return b * 1e6, a * 1e6


async def many_streams(b: Bench, fake: Proc, app: Proc, tokens: int) -> dict[str, Any]:
    concurrency = b.n(1000, 200)
    length = tokens * DELAY
    common = {
        "count": 2 * concurrency,
        "concurrency": concurrency,
        "stagger_s": length,
        "timeout_s": 60.0,
    }
    sampler = Sampler({"app": app.pids(), "fake": fake.pids()}, interval=0.5).start()
    await asyncio.sleep(1.0)
    idle_rss = sampler.sample().rss["app"]
    windows: list[tuple[float, float]] = []

    async def run_direct() -> Job:
        return await b.job([direct(fake, **common)], cpu={"fake": fake}, deadline=120)

    async def run_app() -> Job:
        job = await b.job(
            [send(app, b.conversations, stream=True, **common)],
            cpu={"app": app, "fake": fake},
            deadline=120,
        )
        start = job.part()["start"]
        windows.append((start + length + 0.5, start + 2 * length - 0.5))
        return job

    jobs = await interleave(b.n(2, 1), {"direct": run_direct, "app": run_app})
    cores = [sampler.cpu_rate("app", a, z) for a, z in windows]
    fake_cores = [sampler.cpu_rate("fake", a, z) for a, z in windows]
    peak = max(sampler.max_rss("app", a, z) for a, z in windows)
    # Turns outlive their clients: wait until the app has finished the backlog (its CPU
    # falls quiet), then for idle connections to time out.
    for _ in range(b.n(90, 20)):
        before = sampler.sample()
        await asyncio.sleep(1.0)
        if sampler.sample().cpu["app"] - before.cpu["app"] < 0.05:
            break
    # The upstream keep-alive connections the burst opened close 15 s after their last use
    # (`chatbot_api.llm.http.KEEPALIVE`; 15-30 s with aiohttp, the client before): the RSS is
    # read before and after that.
    settle, late = b.n(20, 3), b.n(45, 5)
    await asyncio.sleep(settle)
    after = sampler.sample().rss["app"]
    await asyncio.sleep(late - settle)
    after_late = sampler.sample().rss["app"]
    await sampler.stop()
    done = sum(j.part()["streams_done"] for j in jobs["app"])
    b.shared["stream_memory"] = {
        "streams": concurrency,
        "completed_fraction": done / max(1, sum(j.part()["sent"] for j in jobs["app"])),
        "idle_rss": idle_rss,
        "peak_rss": peak,
        "after_rss": after,
        "settle_s": settle,
        "after_late_rss": after_late,
        "late_s": late,
    }
    return {"jobs": jobs, "cores": cores, "fake_cores": fake_cores, "concurrency": concurrency}


async def relay_floor(b: Bench) -> list[dict[str, Any]]:
    """CPU per relayed delta, app against the reference relay, paced and unpaced. All-in (per
    turn costs included), so the streams are long: 300 deltas."""
    tokens = 300
    rows: list[dict[str, Any]] = []
    for label, delay in (("paced 20 ms", 0.02), ("unpaced", 0.0)):
        async with b.scope() as reg:
            fake = await b.fake(reg, "s3-relay-fake", FakeConfig(tokens=tokens, token_delay=delay))
            app = await b.app(reg, "s3-relay-app", fake, pool=(10, 0))
            url = f"http://127.0.0.1:{fake.port}/v1"
            ref = await start_reference(reg, "s3-relay-reference", dsn(b.db), url)
            for proc in (app, ref):
                await b.job([send(proc, b.conversations, stream=True, count=50, concurrency=25)])

            def phase(proc: Proc) -> Any:
                async def go() -> Job:
                    spec = send(proc, b.conversations, stream=True, count=100, concurrency=100)
                    spec["timeout_s"] = 60.0
                    return await b.job([spec], cpu={"server": proc}, deadline=120)

                return go

            jobs = await interleave(b.n(2, 1), {"reference": phase(ref), "app": phase(app)})
        per_delta = {
            name: sum(j.cpu("server") for j in runs)
            / max(1, sum(j.part()["deltas"] for j in runs))
            * 1e6
            for name, runs in jobs.items()
        }
        for name in ("reference", "app"):
            rows.append(
                {
                    "deltas": label,
                    "server": name,
                    "streams ok/sent": "/".join(
                        str(sum(j.part()[k] for j in jobs[name])) for k in ("streams_done", "sent")
                    ),
                    "CPU per delta us": per_delta[name],
                    "vs reference": per_delta[name] / per_delta["reference"],
                }
            )
    return rows


async def run(b: Bench) -> None:
    tokens = b.n(150, 40)
    async with b.scope() as reg:
        fake_short = await b.fake(reg, "s3-fake-short", FakeConfig(tokens=SHORT, token_delay=DELAY))
        fake_long = await b.fake(reg, "s3-fake-long", FakeConfig(tokens=tokens, token_delay=DELAY))
        app_short = await b.app(reg, "s3-app-short", fake_short, pool=(10, 0))
        app_long = await b.app(reg, "s3-app-long", fake_long, pool=(10, 0))
        await b.job([send(app_short, b.conversations, stream=True, count=200, concurrency=100)])
        await b.job([send(app_long, b.conversations, stream=True, count=50, concurrency=50)])

        # Time to first token at 100 concurrent streams.
        common = {"count": b.n(600, 150), "concurrency": 100, "stagger_s": SHORT * DELAY}

        async def ttft_direct() -> Job:
            return await b.job([direct(fake_short, **common)], cpu={"fake": fake_short})

        async def ttft_app() -> Job:
            spec = send(app_short, b.conversations, stream=True, **common)
            return await b.job([spec], cpu={"app": app_short, "fake": fake_short})

        short = await interleave(b.n(2, 1), {"direct": ttft_direct, "app": ttft_app})
        # The long replies at the same 100 streams, for the marginal cost of a delta: at
        # 1,000 streams an overloaded app would charge its queueing to the tokens.
        length = tokens * DELAY
        spec = send(app_long, b.conversations, stream=True, count=b.n(200, 100), concurrency=100)
        spec |= {"stagger_s": length, "timeout_s": 60.0}
        long100 = [await b.job([spec], cpu={"app": app_long}, deadline=4 * length + 30)]
        many = await many_streams(b, fake_long, app_long, tokens)
    floor = await relay_floor(b)

    ttft_app_h = merge([j.part()["ttft"] for j in short["app"]])
    ttft_dir_h = merge([j.part()["ttft"] for j in short["direct"]])
    flag = invalid(short["app"] + short["direct"])
    for p, limit in ((50, 3.0), (99, 10.0)):
        added = pct_ms(ttft_app_h, p) - pct_ms(ttft_dir_h, p)
        note = f"app {pct_ms(ttft_app_h, p):.2f} ms vs direct {pct_ms(ttft_dir_h, p):.2f} ms"
        b.results.add(
            Target(3, f"added TTFT p{p} @100 streams", added, "ms", "<=", limit, note, flag)
        )

    long_jobs: dict[str, list[Job]] = many["jobs"]
    flag = invalid(long_jobs["app"] + long_jobs["direct"])
    cores = max(many["cores"]) if many["cores"] else float("nan")
    deltas = sum(j.part()["deltas"] for j in long_jobs["app"])
    naive = sum(j.cpu("app") for j in long_jobs["app"]) / max(1, deltas) * 1e6
    note = (
        f"{many['concurrency']} streams x {tokens} deltas at 20/s; worst round, steady window; "
        f"rounds {', '.join(f'{c:.2f}' for c in many['cores'])}; fake LLM "
        f"{max(many['fake_cores'], default=0):.2f} core; all-in CPU per delta {naive:.0f} us"
    )
    b.results.add(
        Target(3, f"app CPU, {many['concurrency']} streams", cores, "core", "<=", 0.6, note, flag)
    )
    gap_app = merge([j.part()["gap"] for j in long_jobs["app"]])
    gap_dir = merge([j.part()["gap"] for j in long_jobs["direct"]])
    added_gap = pct_ms(gap_app, 99) - pct_ms(gap_dir, 99)
    note = f"app p99 {pct_ms(gap_app, 99):.1f} ms vs direct {pct_ms(gap_dir, 99):.1f} ms"
    note += " (deltas paced at 50 ms)"
    b.results.add(Target(3, "added inter-token gap p99", added_gap, "ms", "<=", 5, note, flag))

    marginal, per_stream = per_token_us(short["app"], long100)
    cost = {(r["deltas"], r["server"]): r["CPU per delta us"] for r in floor}
    note = (
        f"marginal, from CPU = a*streams + b*deltas over {SHORT}- and {tokens}-delta streams, "
        f"100 at a time; a = {per_stream:.0f} us per stream; same run, long streams: the raw "
        f"reference relay {cost['paced 20 ms', 'reference']:.0f} us paced / "
        f"{cost['unpaced', 'reference']:.0f} us unpaced, the app "
        f"{cost['paced 20 ms', 'app']:.0f} / {cost['unpaced', 'app']:.0f} us"
    )
    b.results.add(Target(3, "server CPU per relayed token", marginal, "us", "<=", 20, note))
    b.results.detail(
        3,
        "time-to-first-token phases (100 streams)",
        stream_rows("direct", short["direct"], None)
        + stream_rows("app", short["app"], "app")
        + stream_rows(f"app, {tokens} deltas", long100, "app"),
    )
    b.results.detail(3, "CPU per relayed delta, app vs the raw reference relay", floor)
    b.results.detail(
        3,
        f"{many['concurrency']}-stream phases",
        stream_rows("direct", long_jobs["direct"], None)
        + stream_rows("app", long_jobs["app"], "app"),
    )
