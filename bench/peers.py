"""Peer comparison (`make bench-peers`, optional): LiteLLM's proxy and the app side by side,
against the same fake LLM, in the same run.

LiteLLM is installed into its own virtualenv (`bench/.venv-peers`, `litellm[proxy]`), so its
dependencies never meet the app's. The proxy runs one worker with no database (it stores no
history); the app stores every message. Both authenticate every request: the proxy checks its
master key (in memory), the app looks its API key up in PostgreSQL (`AUTH_MODE=enabled`).
Open loop at `--rate` req/s, interleaved A/B/C: the fake called directly, the proxy relaying
the same streamed chat-completions request, and the app's streamed send-message. Reported:
p50/p99 added to the direct call, and server CPU per request. Writes `bench/results/peers.md`
and `peers.json`.

    python -m bench.peers [--rate 20] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Bench, Job, direct, interleave, send
from bench.results import Results, merge, pct_ms
from bench.run import prepare, raise_fd_limit
from bench.seed import create_key, drop_database
from bench.servers import LOGS, FakeConfig, LoadGen, Proc, Registry, free_port, wait_http

VENV = Path(__file__).resolve().parent / ".venv-peers"
PACKAGE = "litellm[proxy]"


def ensure_litellm() -> Path:
    """The proxy's executable, installed on first use into its own venv."""
    exe = VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {PACKAGE} into {VENV} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, timeout=600)
        subprocess.run([*pip, PACKAGE], check=True, timeout=1800)
    return exe


def litellm_version() -> str:
    python = str(VENV / "bin" / "python")
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


async def start_litellm(reg: Registry, exe: Path, fake: Proc, master_key: str) -> Proc:
    port = free_port()
    config = LOGS / "litellm-config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/fake\n"
        f"      api_base: http://127.0.0.1:{fake.port}/v1\n"
        "      api_key: x\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    # Warnings only, as for the app (`LOG_LEVEL=WARNING`): no access log on either side.
    env = {"LITELLM_MASTER_KEY": master_key, "LITELLM_LOG": "WARNING"}
    proc = await reg.spawn("peers-litellm", [*argv, "--num_workers", "1"], env=env, port=port)
    await wait_http(proc, "/health/liveliness", within=180)
    return proc


def report(results: Results, jobs: dict[str, list[Job]], rate: float) -> None:
    """One row per server: latency added to the direct call and server CPU per request.
    Informational: the issue sets no target for the peers, so nothing is PASS or FAIL."""
    base = merge([j.part()["latency"] for j in jobs["direct"]])
    rows = []
    for name, group in (("direct", "fake"), ("litellm", "server"), ("app", "server")):
        h = merge([j.part()["latency"] for j in jobs[name]])
        ok = sum(j.part()["ok"] for j in jobs[name])
        sent = sum(j.part()["sent"] for j in jobs[name])
        cpu = sum(j.cpu(group) for j in jobs[name]) / max(1, ok) * 1e6
        rows.append(
            {
                "server": {"direct": "fake LLM, direct"}.get(name, name),
                "ok/sent": f"{ok}/{sent}",
                "p50 ms": pct_ms(h, 50),
                "p99 ms": pct_ms(h, 99),
                "added p50 ms": pct_ms(h, 50) - pct_ms(base, 50) if name != "direct" else 0.0,
                "added p99 ms": pct_ms(h, 99) - pct_ms(base, 99) if name != "direct" else 0.0,
                "server CPU/request us": cpu,
                "loadgen cores (max)": max(j.loadgen_cores for j in jobs[name]),
            }
        )
        print(f"{name:8} {rows[-1]}", flush=True)
    results.detail(0, f"streamed chat turns at {rate:g} req/s, open loop", rows)


async def main_async(args: argparse.Namespace) -> None:
    raise_fd_limit()
    exe = await asyncio.to_thread(ensure_litellm)
    reg = Registry()
    results = Results(quick=False)
    b = Bench(reg, LoadGen(reg), results, False, args.db)
    wall = time.monotonic()
    try:
        await prepare(b)
        results.env["peers"] = (
            f"LiteLLM {litellm_version()} proxy (1 worker, no database, master key, "
            "LITELLM_LOG=WARNING) and the app (1 worker, pool 10, AUTH_MODE=enabled with an API "
            "key), same fake LLM, same requests"
        )
        async with b.scope() as scope:
            fake = await b.fake(scope, "peers-fake", FakeConfig())
            app = await b.app(scope, "peers-app", fake, env={"AUTH_MODE": "enabled"})
            app_key = await create_key(b.db)
            master_key = f"sk-{secrets.token_hex(32)}"
            proxy = await start_litellm(scope, exe, fake, master_key)
            common = {"count": int(args.rate * args.seconds), "rate": args.rate, "concurrency": 256}
            warm = send(app, b.conversations, count=300, concurrency=8, stream=True)
            await b.job([warm | {"bearer": app_key}])
            proxied = direct(fake, **common) | {
                "port": proxy.port,
                "name": "litellm",
                "bearer": master_key,
            }
            await b.job([proxied | {"count": 300, "rate": 50.0}])

            async def run_direct() -> Job:
                return await b.job([direct(fake, **common)], cpu={"fake": fake})

            async def run_proxy() -> Job:
                return await b.job([dict(proxied)], cpu={"server": proxy})

            async def run_app() -> Job:
                spec = send(app, b.conversations, stream=True, **common) | {"bearer": app_key}
                return await b.job([spec], cpu={"server": app})

            jobs = await interleave(
                args.rounds, {"direct": run_direct, "litellm": run_proxy, "app": run_app}
            )
        report(results, jobs, args.rate)
    finally:
        await reg.stop_all()
        await drop_database(args.db)
    path = results.write("peers")
    print(f"{(time.monotonic() - wall) / 60:.1f} min -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description="LiteLLM proxy beside the app.")
    # LiteLLM needed about 30 ms of CPU per streamed request here: above ~30 req/s its one
    # worker falls behind, and its latency is then queueing, not overhead.
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--db", default="chatbot_bench_peers")
    parser.add_argument("--app-src", default=None, help="as for bench.run")
    args = parser.parse_args()
    if args.app_src:
        os.environ["BENCH_APP_SRC"] = os.path.abspath(args.app_src)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
