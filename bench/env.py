"""What the results were measured on: CPU, memory, versions, PostgreSQL settings, git SHA and
how busy the machine was."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Any

import asyncpg

from bench.servers import ROOT

PACKAGES = (
    "chatbot-api",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvloop",
    "httptools",
    "sqlalchemy",
    "asyncpg",
    "aiohttp",
    "llama-cpp-python",
    "hdrhistogram",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


async def commit_latency(dsn: str, n: int = 200) -> float:
    """Median time of a one-row INSERT + COMMIT, in ms: the floor under every write path."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TEMP TABLE bench_probe (x int)")
        times = []
        for i in range(n):
            t = time.perf_counter()
            async with conn.transaction():
                await conn.execute("INSERT INTO bench_probe VALUES ($1)", i)
            times.append(time.perf_counter() - t)
    finally:
        await conn.close()
    times.sort()
    return times[len(times) // 2] * 1000


async def environment(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        pg = await conn.fetchval("SHOW server_version")
        settings = {
            k: await conn.fetchval(f"SHOW {k}")
            for k in ("synchronous_commit", "shared_buffers", "max_connections")
        }
    finally:
        await conn.close()
    # A temp table is per session; its commit still flushes WAL like a real table's would.
    commit_ms = await commit_latency(dsn)
    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": f"{_cpu_model()} x {os.cpu_count()}",
        "memory": f"{_mem_total_gib():.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": _versions(),
        "postgresql": f"{pg}; " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "commit latency (p50, 1-row INSERT+COMMIT)": f"{commit_ms:.2f} ms",
        "git": f"{sha}{' (dirty work tree)' if dirty not in ('', 'unknown') else ''}",
        "load average at start": loadavg(),
        "server settings": "uvicorn (uvloop, httptools), LOG_LEVEL=WARNING (no access log), "
        "AUTH_MODE=disabled; workers and pools are given per scenario",
    }


def run_environment(dsn: str) -> dict[str, Any]:
    return asyncio.run(environment(dsn))
