"""S8. Efficiency: send-message server CPU <= 1.5x a raw-asyncpg reference doing the same
statements (`bench/reference_app.py`), measured in the same run.

Closed loop, fixed counts, interleaved A/B/A/B, one worker each, same fake LLM (zero latency),
same pool size. Create-conversation is compared the same way, for information, and so is a
send through a second app with API-key authentication on (`AUTH_MODE=enabled`, the default):
the target is taken with it off, as the reference authenticates nobody. A third send phase
gives every request a new `Idempotency-Key` (what a client that retries safely sends), also
for information.
"""

from __future__ import annotations

from typing import Any

from bench.common import Bench, Job, create, interleave, invalid, send
from bench.results import Target, merge, pct_ms
from bench.seed import create_key, dsn
from bench.servers import FakeConfig, Proc, start_reference


def cpu_per_ok(jobs: list[Job], group: str) -> float:
    ok = sum(j.part()["ok"] for j in jobs)
    return sum(j.cpu(group) for j in jobs) / ok * 1e6 if ok else float("nan")


def phase_rows(label: str, jobs: list[Job], group: str) -> list[dict[str, Any]]:
    return [
        {
            "phase": f"{label} r{r}",
            "ok/sent": f"{j.part()['ok']}/{j.part()['sent']}",
            "req/s": j.part()["rps"],
            "p50 ms": j.part()["latency"].get("p50", 0) / 1000,
            "p99 ms": j.part()["latency"].get("p99", 0) / 1000,
            "server CPU/req us": j.cpu_per_ok_us(group),
            "loadgen cores": j.loadgen_cores,
            "machine busy cores": j.machine_cores,
        }
        for r, j in enumerate(jobs, 1)
    ]


async def run(b: Bench) -> None:
    async with b.scope() as reg:
        fake = await b.fake(reg, "s8-fake", FakeConfig())
        app = await b.app(reg, "s8-app", fake, pool=(10, 0))
        keyed = await b.app(reg, "s8-app-keys", fake, pool=(10, 0), env={"AUTH_MODE": "enabled"})
        key = await create_key(b.db)
        fake_url = f"http://127.0.0.1:{fake.port}/v1"
        ref = await start_reference(reg, "s8-reference", dsn(b.db), fake_url)
        await b.warm(app, count=b.n(500, 200))
        await b.warm(ref, count=b.n(500, 200))
        warm = send(keyed, b.conversations, count=b.n(500, 200), concurrency=8)
        await b.job([warm | {"bearer": key}])
        count, conc, rounds = b.n(3000, 600), 16, b.n(2, 1)
        cap = b.n(15, 4)  # seconds

        def sender(proc: Proc, bearer: str | None = None, *, idempotency: bool = False) -> Any:
            async def go() -> Job:
                spec = send(proc, b.conversations, count=count, concurrency=conc, duration_s=cap)
                if bearer is not None:
                    spec["bearer"] = bearer
                spec["idempotency"] = idempotency
                return await b.job([spec], cpu={"server": proc})

            return go

        def creator(proc: Proc) -> Any:
            async def go() -> Job:
                return await b.job(
                    [create(proc, count=count, concurrency=conc, duration_s=cap)],
                    cpu={"server": proc},
                )

            return go

        sends = await interleave(
            rounds,
            {
                "reference": sender(ref),
                "app": sender(app),
                "app, API key": sender(keyed, key),
                "app, Idempotency-Key": sender(app, idempotency=True),
            },
        )
        creates = await interleave(rounds, {"reference": creator(ref), "app": creator(app)})

    app_cpu, ref_cpu = cpu_per_ok(sends["app"], "server"), cpu_per_ok(sends["reference"], "server")
    ratio = app_cpu / ref_cpu
    app_p50 = pct_ms(merge([j.part()["latency"] for j in sends["app"]]), 50)
    ref_p50 = pct_ms(merge([j.part()["latency"] for j in sends["reference"]]), 50)
    flag = invalid(sends["app"] + sends["reference"])
    note = (
        f"app {app_cpu:.0f} us/turn vs reference {ref_cpu:.0f} us/turn; "
        f"p50 {app_p50:.2f} vs {ref_p50:.2f} ms at concurrency {conc}"
    )
    b.results.add(Target(8, "send-message CPU vs raw asyncpg", ratio, "x", "<=", 1.5, note, flag))
    c_app, c_ref = cpu_per_ok(creates["app"], "server"), cpu_per_ok(creates["reference"], "server")
    b.results.detail(
        8,
        "create conversation (information)",
        f"app {c_app:.0f} us vs reference {c_ref:.0f} us per request ({c_app / c_ref:.2f}x)",
    )
    keyed_cpu = cpu_per_ok(sends["app, API key"], "server")
    b.results.detail(
        8,
        "send with API-key auth on (information)",
        f"app {keyed_cpu:.0f} us vs {app_cpu:.0f} us per turn with auth off "
        f"(+{keyed_cpu - app_cpu:.0f} us); {keyed_cpu / ref_cpu:.2f}x the reference",
    )
    idempotent_cpu = cpu_per_ok(sends["app, Idempotency-Key"], "server")
    b.results.detail(
        8,
        "send with an Idempotency-Key (information)",
        f"app {idempotent_cpu:.0f} us vs {app_cpu:.0f} us per turn without "
        f"(+{idempotent_cpu - app_cpu:.0f} us); {idempotent_cpu / ref_cpu:.2f}x the reference",
    )
    b.results.detail(
        8,
        "send phases",
        phase_rows("reference", sends["reference"], "server")
        + phase_rows("app", sends["app"], "server")
        + phase_rows("app, API key", sends["app, API key"], "server")
        + phase_rows("app, Idempotency-Key", sends["app, Idempotency-Key"], "server"),
    )
    b.results.detail(
        8,
        "create phases",
        phase_rows("reference", creates["reference"], "server")
        + phase_rows("app", creates["app"], "server"),
    )
    b.shared["s8"] = {
        "app_send_us": app_cpu,
        "ref_send_us": ref_cpu,
        "app_create_us": c_app,
        "app_send_with_key_us": keyed_cpu,
        "app_send_with_idempotency_key_us": idempotent_cpu,
    }
