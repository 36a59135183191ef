"""S6. Memory: idle worker <= 80 MB RSS without the local model; <= 40 KB per open stream; RSS
back within 10% of idle after load; no growth over a 10-minute soak (`make bench-soak`; the
suite runs a short one).

- Idle: a fresh worker (one process) after a warm-up of creates, sends and streams.
- Per open stream: a fresh worker, warmed up, then 1,000 streams held open at once, a delta a
  second each, so the worker keeps up (a sixth of a core here): (peak RSS with every stream open -
  its RSS just before) / streams. That is what an open stream holds. The same burst then runs
  again on that worker, for information: what it adds shows whether the memory the first
  burst left behind is reused or added to. S3's worker, which
  carries 1,000 streams at 20 deltas/s on a saturated core, also holds the backlog it is too
  slow to send: its figure is given beside it.
- Back to idle: S3's worker, once its load is over and idle connections have timed out (the
  harder case: its allocator saw the backlog), 45 s after its CPU fell quiet: the upstream
  keep-alive connections close 15 s after their last use. The figure at 20 s is given
  beside it. If S3 did not run, the same load runs here.
- Growth: a mixed open-loop load (sends, streams, creates) on a fresh worker while RSS is
  sampled; growth is the median of the last tenth of the samples minus the median of the
  tenth at the half-way point, so warm-up does not count and one outlier does not decide.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from bench.common import Bench, create, send
from bench.procstat import Sampler, rss_bytes
from bench.results import LOADGEN_LIMIT, Target
from bench.servers import FakeConfig, Proc, Registry

MB = 1024 * 1024
# Held streams: a delta a second, all opened within the first few seconds.
HELD_GAP = 1.0
# After a burst of held streams: longer than uvicorn's (5 s) and the provider's (15 s) keep-alive
# timeouts, so the idle connections a burst leaves are closed.
HELD_SETTLE = 20.0


async def held_streams(b: Bench) -> dict[str, Any]:
    """RSS per open stream on a worker that keeps up with its streams."""
    async with b.scope() as reg:
        return await _held_streams(b, reg)


async def _held_streams(b: Bench, reg: Registry) -> dict[str, Any]:
    streams, deltas, stagger = b.n(1000, 200), b.n(30, 12), b.n(5.0, 2.0)
    fake = await b.fake(reg, "s6-held-fake", FakeConfig(tokens=deltas, token_delay=HELD_GAP))
    app = await b.app(reg, "s6-held-app", fake)
    # Warm-up: every code path of a stream runs, and the allocator has its first arenas.
    await b.job(
        [send(app, b.conversations, stream=True, count=100, concurrency=100, timeout_s=60.0)],
        deadline=120,
    )
    spec = send(
        app,
        b.conversations,
        stream=True,
        count=streams,
        concurrency=streams,
        stagger_s=stagger,
        timeout_s=60.0,
    )
    bursts = []
    # The same burst twice on one worker: the second shows whether what the first left
    # behind is reused (a high-water mark) or added to (growth).
    for _ in range(2):
        sampler = Sampler({"app": app.pids()}, interval=0.5).start()
        await asyncio.sleep(2.0)
        before = sampler.sample().rss["app"]
        job = await b.job([spec], cpu={"app": app}, deadline=120)
        await asyncio.sleep(HELD_SETTLE)
        after = sampler.sample().rss["app"]
        await sampler.stop()
        start = job.part()["start"]
        # Every stream is open from the end of the stagger until the first ones finish.
        window = (start + stagger + 1.0, start + deltas * HELD_GAP - 1.0)
        bursts.append(
            {
                "before_rss": before,
                "peak_rss": sampler.max_rss("app", *window),
                "after_rss": after,
                "cores": sampler.cpu_rate("app", *window),
                "ok": job.part()["streams_done"],
                "loadgen_cores": job.loadgen_cores,
            }
        )
    first, second = bursts
    return {"streams": streams, **first, "second": second}


async def soak(b: Bench, app: Proc, fake: Proc, seconds: float, interval: float) -> dict[str, Any]:
    """Mixed load for `seconds`: 40 sends/s, 10 streams/s, 10 creates/s (open loop)."""
    sampler = Sampler({"app": app.pids()}, interval=interval).start()
    parts = [
        send(app, b.conversations, rate=40, count=int(40 * seconds), concurrency=128),
        send(app, b.conversations, stream=True, rate=10, count=int(10 * seconds), concurrency=64),
        create(app, rate=10, count=int(10 * seconds), concurrency=32),
    ]
    job = await b.job(parts, cpu={"app": app}, deadline=seconds + 60)
    await sampler.stop()
    rss = [s.rss["app"] for s in sampler.samples]
    tenth = max(1, len(rss) // 10)
    half = len(rss) // 2
    middle = statistics.median(rss[half - tenth // 2 : half + tenth - tenth // 2] or rss)
    last = statistics.median(rss[-tenth:])
    return {
        "seconds": seconds,
        "samples": len(rss),
        "start_rss": rss[0],
        "middle_rss": middle,
        "end_rss": last,
        "max_rss": max(rss),
        "growth": last - middle,
        "ok": sum(p["ok"] for p in job.raw["parts"]),
        "sent": sum(p["sent"] for p in job.raw["parts"]),
        "loadgen_cores": job.loadgen_cores,
        "send_p99_ms": job.part(0)["latency"].get("p99", 0) / 1000,
        "series_mb": [round(r / MB, 1) for r in rss[:: max(1, len(rss) // 40)]],
    }


def growth_target(b: Bench, result: dict[str, Any], label: str) -> None:
    limit_mb = max(2.0, 0.02 * result["middle_rss"] / MB)
    flag = ""
    if result["loadgen_cores"] > LOADGEN_LIMIT:
        flag = f"load generator at {result['loadgen_cores']:.0%} of a core"
    note = (
        f"{label}: {result['seconds']:.0f} s, {result['ok']}/{result['sent']} ok; RSS "
        f"{result['start_rss'] / MB:.1f} -> {result['middle_rss'] / MB:.1f} (half-way) -> "
        f"{result['end_rss'] / MB:.1f} MB; limit max(2 MB, 2% of RSS); send p99 "
        f"{result['send_p99_ms']:.0f} ms (a growing backlog, not a leak, if large)"
    )
    b.results.add(
        Target(
            6,
            f"RSS growth, 2nd half of {label}",
            result["growth"] / MB,
            "MB",
            "<=",
            limit_mb,
            note,
            flag,
        )
    )


async def run(b: Bench) -> None:
    async with b.scope() as reg:
        fake = await b.fake(reg, "s6-fake", FakeConfig())
        app = await b.app(reg, "s6-app", fake)
        start_rss = rss_bytes(app.pid)
        await b.job(
            [
                send(app, b.conversations, count=300, concurrency=8),
                send(app, b.conversations, stream=True, count=100, concurrency=4),
                create(app, count=200, concurrency=4),
            ]
        )
        await asyncio.sleep(2.0)
        idle = rss_bytes(app.pid)
        note = f"one worker, remote provider; {start_rss / MB:.1f} MB just after start-up"
        b.results.add(Target(6, "idle worker RSS (after warm-up)", idle / MB, "MB", "<=", 80, note))

        if "stream_memory" not in b.shared:
            from bench.scenarios.s3_streaming import many_streams

            tokens = b.n(150, 40)
            fake_long = await b.fake(
                reg, "s6-fake-long", FakeConfig(tokens=tokens, token_delay=0.05)
            )
            app_long = await b.app(reg, "s6-app-long", fake_long)
            await b.job([send(app_long, b.conversations, stream=True, count=50, concurrency=50)])
            await many_streams(b, fake_long, app_long, tokens)
        mem = b.shared["stream_memory"]
        held = await held_streams(b)
        per = (held["peak_rss"] - held["before_rss"]) / held["streams"] / 1024
        saturated = (mem["peak_rss"] - mem["idle_rss"]) / mem["streams"] / 1024
        # S3's worker may not have finished all its streams in time: said beside its figures.
        slow = ""
        if mem["completed_fraction"] < 0.9:
            slow = f"; only {mem['completed_fraction']:.0%} of the streams completed in time"
        note = (
            f"{held['streams']} streams held open, a delta a second, app at "
            f"{held['cores']:.2f} core: {held['before_rss'] / MB:.1f} -> "
            f"{held['peak_rss'] / MB:.1f} MB, {held['ok']} completed; S3's saturated worker "
            f"(20 deltas/s each, backlog included): {saturated:.1f} KB"
        )
        flag = ""
        if held["loadgen_cores"] > LOADGEN_LIMIT:
            flag = f"load generator at {held['loadgen_cores']:.0%} of a core"
        b.results.add(Target(6, "RSS per open stream", per, "KB", "<=", 40, note, flag))
        again = held["second"]
        again_per = (again["peak_rss"] - again["before_rss"]) / held["streams"] / 1024
        b.results.detail(
            6,
            "the same burst again (information)",
            f"on the same worker: {again_per:.1f} KB more per open stream "
            f"({held['streams']} streams, {again['ok']} completed); "
            f"RSS {held['before_rss'] / MB:.1f} MB before the first burst, "
            f"{held['after_rss'] / MB:.1f} MB {HELD_SETTLE:.0f} s after it, "
            f"{again['after_rss'] / MB:.1f} MB {HELD_SETTLE:.0f} s after the second",
        )
        b.results.detail(6, "held streams", held)
        back = (mem["after_late_rss"] - mem["idle_rss"]) / mem["idle_rss"] * 100
        note = (
            f"S3's worker: {mem['after_late_rss'] / MB:.1f} MB {mem['late_s']} s after "
            f"{mem['streams']} streams ({mem['after_rss'] / MB:.1f} MB after "
            f"{mem['settle_s']} s, before the late trim), idle "
            f"{mem['idle_rss'] / MB:.1f} MB{slow}"
        )
        b.results.add(Target(6, "RSS after load vs idle", back, "%", "<=", 10, note))

        result = await soak(b, app, fake, b.n(120, 15), 2.0)
        growth_target(b, result, "short soak")
        b.results.detail(6, "short soak RSS series (MB)", result["series_mb"])
