"""S2. Added overhead, non-streaming, zero-latency fake, including the history read and both
inserts: p50 <= 2 ms and p99 <= 8 ms at 100 req/s; p99 <= 15 ms at 500 req/s.

Open loop (latency from the intended send time), interleaved A/B/A/B: A is the fake LLM
called directly with the request the app makes for a turn, B the app (two workers, the
default on this box, default pool). Added latency = app percentile - direct percentile, over
the pooled histograms of the rounds.
"""

from __future__ import annotations

from typing import Any

from bench.common import DEFAULT_POOL, Bench, Job, direct, interleave, invalid, send
from bench.results import Target, merge, pct_ms
from bench.servers import FakeConfig

WORKERS = 2


def added(apps: list[Job], directs: list[Job]) -> dict[str, float]:
    a = merge([j.part()["latency"] for j in apps])
    d = merge([j.part()["latency"] for j in directs])
    out = {}
    for p in (50, 90, 99, 99.9):
        out[f"app p{p:g}"] = pct_ms(a, p)
        out[f"direct p{p:g}"] = pct_ms(d, p)
        out[f"added p{p:g}"] = pct_ms(a, p) - pct_ms(d, p)
    return out


def rows(label: str, jobs: list[Job], group: str | None) -> list[dict[str, Any]]:
    out = []
    for r, job in enumerate(jobs, 1):
        part = job.part()
        lat = part["latency"]
        out.append(
            {
                "phase": f"{label} r{r}",
                "ok/sent": f"{part['ok']}/{part['sent']}",
                "p50 ms": lat.get("p50", 0) / 1000,
                "p99 ms": lat.get("p99", 0) / 1000,
                "max ms": lat.get("max", 0) / 1000,
                "send lag p99 ms": part.get("send_lag", {}).get("p99", 0) / 1000,
                "server CPU/req us": job.cpu_per_ok_us(group) if group else float("nan"),
                "loadgen cores": job.loadgen_cores,
                "machine busy cores": job.machine_cores,
                "statuses": part["statuses"],
            }
        )
    return out


async def run(b: Bench) -> None:
    async with b.scope() as reg:
        fake = await b.fake(reg, "s2-fake", FakeConfig())
        app = await b.app(reg, "s2-app", fake, workers=WORKERS, pool=DEFAULT_POOL)
        await b.warm(app, count=b.n(600, 200))
        rounds = b.n(2, 1)
        for rate, seconds in ((100, b.n(15, 3)), (500, b.n(8, 2))):
            count = int(rate * seconds)
            common = {"count": count, "rate": rate, "concurrency": 256, "prefill": 32}

            limit = seconds + 15.0  # then unfinished requests count at the time they waited

            async def run_direct(common: dict[str, Any] = common, limit: float = limit) -> Job:
                return await b.job([direct(fake, **common)], cpu={"fake": fake}, deadline=limit)

            async def run_app(common: dict[str, Any] = common, limit: float = limit) -> Job:
                return await b.job(
                    [send(app, b.conversations, **common)],
                    cpu={"app": app, "fake": fake},
                    deadline=limit,
                )

            jobs = await interleave(rounds, {"direct": run_direct, "app": run_app})
            stats = added(jobs["app"], jobs["direct"])
            flag = invalid(jobs["app"] + jobs["direct"])
            failed = sum(j.part()["sent"] - j.part()["ok"] for j in jobs["app"])
            note = f"{WORKERS} workers; app p50 {stats['app p50']:.2f} ms vs direct "
            note += f"{stats['direct p50']:.2f} ms; {failed} failed requests"
            if rate == 100:
                b.results.add(
                    Target(2, "added p50 @100 req/s", stats["added p50"], "ms", "<=", 2, note, flag)
                )
                b.results.add(
                    Target(2, "added p99 @100 req/s", stats["added p99"], "ms", "<=", 8, note, flag)
                )
            else:
                b.results.add(
                    Target(
                        2, "added p99 @500 req/s", stats["added p99"], "ms", "<=", 15, note, flag
                    )
                )
            cpu = sum(j.cpu("app") for j in jobs["app"]) / max(
                1, sum(j.part()["ok"] for j in jobs["app"])
            )
            b.results.detail(
                2, f"{rate} req/s pooled (ms)", {k: round(v, 3) for k, v in stats.items()}
            )
            b.results.detail(2, f"{rate} req/s server CPU per request", f"{cpu * 1e6:.0f} us")
            b.results.detail(
                2,
                f"{rate} req/s phases",
                rows("direct", jobs["direct"], None) + rows("app", jobs["app"], "app"),
            )
