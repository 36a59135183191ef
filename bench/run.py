"""The benchmark suite's entry point (`make bench`):

    python -m bench.run [--quick] [--scenario N ...] [--keep-db] [--bearer KEY]

In order: a fresh PostgreSQL database (`chatbot_bench`), migrated by the app; the environment
recorded; the load-generator process started; the database seeded through rows the app wrote
itself; then each scenario, which starts its own fake LLM and app processes and stops them.
Every target is printed with its measured value and PASS or FAIL as it is measured, again at
the end, and written to `bench/results/latest.md` and `latest.json`. A scenario that crashes
reports ERROR and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import asyncpg

from bench import env as envmod
from bench.common import Bench
from bench.results import Results, Target
from bench.seed import (
    Seeder,
    analyze,
    capture_templates,
    drop_database,
    dsn,
    migrate,
    recreate_database,
    table_counts,
)
from bench.servers import LOGS, FakeConfig, LoadGen, Registry

SCENARIOS = {
    1: ("bench.scenarios.s1_inflight", "In-flight capacity"),
    2: ("bench.scenarios.s2_overhead", "Added overhead, non-streaming"),
    3: ("bench.scenarios.s3_streaming", "Streaming"),
    4: ("bench.scenarios.s4_ceilings", "Throughput ceilings"),
    5: ("bench.scenarios.s5_context", "Cost bounded by the context window"),
    6: ("bench.scenarios.s6_memory", "Memory"),
    7: ("bench.scenarios.s7_local", "Embedded model"),
    8: ("bench.scenarios.s8_efficiency", "Efficiency against raw asyncpg"),
}


async def postmaster_start(db: str) -> str:
    """When PostgreSQL last started: a change means someone restarted it under us."""
    for _ in range(30):
        try:
            conn = await asyncpg.connect(dsn(db))
            try:
                return str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(1.0)
    return "unreachable"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


async def seed(b: Bench, reg: Registry) -> None:
    """Seed through rows the app wrote: 10k conversations of 10 messages (100k), ANALYZEd."""
    fake = await b.fake(reg, "seed-fake", FakeConfig())
    app = await b.app(reg, "seed-app", fake)
    conn = await asyncpg.connect(dsn(b.db))
    try:
        templates = await capture_templates(conn, app.port)
        from chatbot_api.llm.tokens import TokenEstimator

        b.seeder = Seeder(templates, TokenEstimator().count)
        started = time.monotonic()
        count = b.n(10_000, 2_000)
        b.conversations = await b.seeder.insert(conn, count, 10)
        await analyze(conn)
        counts = await table_counts(conn)
    finally:
        await conn.close()
    print(
        f"seeded {counts['conversations']:,} conversations, {counts['messages']:,} messages "
        f"in {time.monotonic() - started:.1f}s",
        flush=True,
    )
    b.results.env["seed"] = (
        f"{counts['conversations']:,} conversations, {counts['messages']:,} messages "
        "(10 per conversation, ANALYZEd); random conversation per request"
    )


async def prepare(b: Bench) -> None:
    """A fresh database, migrated and seeded; the environment recorded; the generator up."""
    print(f"creating database {b.db} and migrating it", flush=True)
    try:
        await recreate_database(b.db)
    except OSError as exc:
        raise SystemExit(
            f"PostgreSQL is not reachable at 127.0.0.1:5432 ({exc}); the bench needs it running "
            "with user postgres and trust auth, as `make test` does (see bench/README.md)"
        ) from None
    await migrate(b.db)
    b.results.env.update(await envmod.environment(dsn(b.db)))
    src = os.environ.get("BENCH_APP_SRC")
    label = "the installed work tree"
    if src:
        sha = Path(src).parent / "SHA"  # written beside a `git archive` snapshot, if wanted
        label = src + (f" (snapshot of {sha.read_text().strip()})" if sha.is_file() else "")
    b.results.env["app source"] = label
    await b.gen.start()
    async with b.scope() as seed_reg:
        await seed(b, seed_reg)


async def main_async(args: argparse.Namespace) -> int:
    raise_fd_limit()
    results = Results(quick=args.quick)
    reg = Registry()
    b = Bench(reg, LoadGen(reg), results, args.quick, args.db, bearer=args.bearer)
    b.app_env = dict(kv.split("=", 1) for kv in args.app_env)
    if b.app_env:
        results.env["app settings added (--app-env)"] = b.app_env
    wall = time.monotonic()
    try:
        await prepare(b)
        for number in args.scenario or sorted(SCENARIOS):
            module_name, title = SCENARIOS[number]
            print(f"\n== S{number}: {title}", flush=True)
            started = time.monotonic()
            first = len(results.targets)
            pg_started = await postmaster_start(b.db)
            try:
                module = importlib.import_module(module_name)
                await module.run(b)
            except Exception as exc:
                logging.getLogger("bench").error("S%d failed", number, exc_info=exc)
                (LOGS / f"s{number}-error.txt").write_text(traceback.format_exc())
                reason = f"{type(exc).__name__}: {exc}"[:300]
                results.add(Target(number, title, None, "", "<=", 0, error=reason))
            results.detail(number, "duration", f"{time.monotonic() - started:.0f} s")
            if await postmaster_start(b.db) != pg_started:
                # Another process restarted PostgreSQL (the chaos tests do): not our figures.
                for target in results.targets[first:]:
                    target.invalid = target.invalid or "PostgreSQL was restarted meanwhile"
                print("   PostgreSQL was restarted during this scenario: flagged INVALID")
    finally:
        results.env["load average at end"] = envmod.loadavg()
        await reg.stop_all()
        if not args.keep_db:
            try:
                await drop_database(args.db)
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"could not drop {args.db}: {exc}", file=sys.stderr)
    path = results.write(args.output)
    print(f"\n== Summary ({(time.monotonic() - wall) / 60:.1f} min) -> {path}")
    for target in results.targets:
        print(target.line())
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="The chatbot-api benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    parser.add_argument(
        "--scenario", type=int, action="append", choices=sorted(SCENARIOS), help="repeatable"
    )
    parser.add_argument("--db", default="chatbot_bench", help="database to create and drop")
    parser.add_argument("--keep-db", action="store_true", help="do not drop it at the end")
    parser.add_argument("--bearer", default=None, help="API key sent on every request")
    parser.add_argument("--output", default="latest", help="results file stem in bench/results")
    parser.add_argument(
        "--app-src",
        default=None,
        help="a directory holding another `chatbot_api` package to benchmark instead of the "
        "installed one (e.g. `git archive <sha> src | tar -x -C /tmp/x` then /tmp/x/src; "
        "a file SHA beside it, /tmp/x/SHA, is recorded with the results)",
    )
    parser.add_argument(
        "--app-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every app process, for what-if runs (repeatable)",
    )
    args = parser.parse_args()
    if args.app_src:
        os.environ["BENCH_APP_SRC"] = os.path.abspath(args.app_src)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main_async(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
