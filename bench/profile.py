"""Where the server's time goes: py-spy samples the app while the load generator drives one
request kind, and the folded stacks are summed by package and by function.

    python -m bench.profile send|stream|create [--seconds 15] [--concurrency 16]
        [--tokens N --token-delay S] [--env KEY=VALUE ...] [--idempotency]

It uses its own database (`chatbot_bench_profile`, dropped afterwards), seeded like the
suite's. Output: `bench/results/profile-<kind>.txt` (the summary) and `.folded` (the raw
stacks, for flamegraph tools or speedscope).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path

import asyncpg

from bench.common import Bench, create, send
from bench.results import RESULTS, Results
from bench.seed import (
    Seeder,
    analyze,
    capture_templates,
    drop_database,
    dsn,
    migrate,
    recreate_database,
)
from bench.servers import FakeConfig, LoadGen, Registry

PACKAGES = (
    ("sqlalchemy", "sqlalchemy"),
    ("asyncpg", "asyncpg"),
    ("pydantic", "pydantic"),
    ("fastapi", "fastapi"),
    ("starlette", "starlette"),
    ("uvicorn", "uvicorn"),
    ("aiohttp", "aiohttp"),
    ("chatbot_api", "chatbot_api"),
    ("asyncio", "asyncio/"),
    ("uvloop", "uvloop"),
    ("logging", "logging/"),
    ("json", "json/"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _idle(leaf: str) -> bool:
    """Worker threads parked on a lock or queue: py-spy does not always see them as idle."""
    return any(f"({name}" in leaf for name in ("threading.py", "queue.py", "selectors.py"))


def package_of(file: str) -> str:
    for name, needle in PACKAGES:
        if needle in file:
            return name
    return "other"


def summarise(folded: Path, top: int = 40) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The first frames name the process and thread.
        frames = [f for f in frames if _FRAME.match(f)]
        if not frames or _idle(frames[-1]):
            continue
        total += count
        leaf = _FRAME.match(frames[-1])
        assert leaf is not None
        self_time[f"{leaf['func']} ({leaf['file']})"] += count
        by_package[package_of(leaf["file"])] += count
        for frame in set(frames):
            m = _FRAME.match(frame)
            assert m is not None
            inclusive[f"{m['func']} ({m['file']})"] += count
    out = [f"samples: {total}", "", "self time by package:"]
    for name, count in by_package.most_common():
        out.append(f"  {count / total:6.1%}  {name}")
    out += ["", f"top {top} functions by self time:"]
    for name, count in self_time.most_common(top):
        out.append(f"  {count / total:6.1%}  {name}")
    out += ["", f"top {top} functions by inclusive time:"]
    for name, count in inclusive.most_common(top):
        out.append(f"  {count / total:6.1%}  {name}")
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    db = "chatbot_bench_profile"
    reg = Registry()
    b = Bench(reg, LoadGen(reg), Results(quick=True), quick=True, db=db)
    try:
        await recreate_database(db)
        await migrate(db)
        await b.gen.start()
        fake_config = FakeConfig(tokens=args.tokens, token_delay=args.token_delay)
        fake = await b.fake(reg, "profile-fake", fake_config)
        env = dict(kv.split("=", 1) for kv in args.env)
        app = await b.app(reg, "profile-app", fake, env=env)
        conn = await asyncpg.connect(dsn(db))
        try:
            from chatbot_api.llm.tokens import TokenEstimator

            seeder = Seeder(await capture_templates(conn, app.port), TokenEstimator().count)
            b.conversations = await seeder.insert(conn, 2000, 10)
            await analyze(conn)
        finally:
            await conn.close()
        await b.warm(app, count=300)
        stem = RESULTS / f"profile-{args.kind}{'-keyed' if args.idempotency else ''}"
        spy = await asyncio.create_subprocess_exec(
            pyspy,
            "record",
            "--pid",
            str(app.pid),
            "--duration",
            str(args.seconds),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(stem.with_suffix(".folded")),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        count = 100_000
        if args.kind == "create":
            spec = create(app, count=count, concurrency=args.concurrency)
        else:
            stream = args.kind == "stream"
            spec = send(
                app, b.conversations, count=count, concurrency=args.concurrency, stream=stream
            )
            spec["idempotency"] = args.idempotency
        load = asyncio.create_task(b.job([spec], cpu={"app": app}, deadline=args.seconds + 2))
        await asyncio.wait_for(spy.wait(), args.seconds + 30)
        job = await load
        part = job.part()
        per = job.cpu_per_ok_us("app")
        head = f"{args.kind}: {part['ok']} ok at {part['rps']:.0f}/s, server CPU {per:.0f} us/req"
        summary = head + " (under py-spy, which slows it)\n\n"
        summary += summarise(stem.with_suffix(".folded"))
        stem.with_suffix(".txt").write_text(summary)
        print(summary)
    finally:
        await reg.stop_all()
        await drop_database(db)


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile the app under load with py-spy.")
    parser.add_argument("kind", choices=["send", "stream", "create"])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the app")
    parser.add_argument(
        "--idempotency", action="store_true", help="a new Idempotency-Key on every send"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
