"""The 10-minute soak (`make bench-soak`): one worker under a steady mixed open-loop load
(40 sends/s, 10 streams/s, 10 creates/s against the zero-latency fake LLM) while its RSS is
sampled every 5 s. PASS when the RSS grew by at most max(2 MB, 2%) over the second half.
Writes `bench/results/soak.md` and `soak.json`.

    python -m bench.soak [--seconds 600] [--bearer KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.common import Bench
from bench.results import Results
from bench.run import prepare, raise_fd_limit
from bench.scenarios.s6_memory import growth_target, soak
from bench.seed import drop_database
from bench.servers import FakeConfig, LoadGen, Registry


async def main_async(args: argparse.Namespace) -> None:
    raise_fd_limit()
    reg = Registry()
    results = Results(quick=False)
    b = Bench(reg, LoadGen(reg), results, False, args.db, bearer=args.bearer)
    wall = time.monotonic()
    try:
        await prepare(b)
        async with b.scope() as scope:
            fake = await b.fake(scope, "soak-fake", FakeConfig())
            app = await b.app(scope, "soak-app", fake)
            await b.warm(app, count=500)
            print(f"soaking for {args.seconds:.0f} s", flush=True)
            result = await soak(b, app, fake, args.seconds, 5.0)
        growth_target(b, result, f"{args.seconds / 60:.0f}-minute soak")
        results.detail(6, "RSS series (MB)", result["series_mb"])
    finally:
        await reg.stop_all()
        await drop_database(args.db)
    path = results.write("soak")
    print(f"{(time.monotonic() - wall) / 60:.1f} min -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Memory soak of one worker.")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--db", default="chatbot_bench_soak")
    parser.add_argument("--bearer", default=None)
    parser.add_argument("--app-src", default=None, help="as for bench.run")
    args = parser.parse_args()
    if args.app_src:
        os.environ["BENCH_APP_SRC"] = os.path.abspath(args.app_src)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
