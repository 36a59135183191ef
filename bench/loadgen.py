"""The load generator, run as its own process (`python -m bench.loadgen`) so that its CPU is
measured apart from the server's: one JSON job per line on stdin, one JSON result per line
on stdout.

A job runs its parts concurrently, each against one port:

    open    requests leave on a schedule (`rate` per second); latency is measured from the
            *intended* send time into an HDR histogram, so a stalled server cannot hide its
            tail by slowing the generator down (no coordinated omission). `send_lag` shows
            how late the generator itself was.
    closed  `concurrency` workers, each on its own keep-alive connection, send the next
            request as soon as the previous answer is in, `count` requests in all: used for
            throughput and CPU per request. `stagger_s` spreads the workers' first sends.

Request kinds: `create` (POST a conversation), `send` (POST a message to a conversation taken
at random from the free ones, so that no two requests share one and meet a 409), `direct`
(the same chat-completions request the app makes, sent straight to the fake LLM: the
baseline), and `get`. Every request carries `Authorization: Bearer <key>` when the part has a
`bearer`. Streams are timed per delta: time to first delta, and gaps between deltas.

The job reports its own CPU use (getrusage) and, read from /proc at its start and end, the
CPU time of the server process groups named in `cpu_pids`.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
import uuid
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.client import LOOPBACK, Connection, Pool, Response, build_request
from bench.procstat import group_cpu, machine_busy

HIGHEST_US = 3_600_000_000
_CODE = re.compile(rb'"code"\s*:\s*"([A-Za-z_]+)"')
# What marks a delta and a successful end: the app's SSE events, or the fake's OpenAI chunks.
APP_PATTERNS = (b"event: message.delta", b"event: message.completed")
DIRECT_PATTERNS = (b'"delta":{"content":', b"data: [DONE]")
_FAILURES = (b"event: message.failed", b"event: message.incomplete")


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, HIGHEST_US, 3)


def summary(h: HdrHistogram) -> dict[str, Any]:
    """Percentiles in microseconds, and the encoded histogram for merging across rounds."""
    if h.get_total_count() == 0:
        return {"count": 0}
    return {
        "count": h.get_total_count(),
        "mean": h.get_mean_value(),
        "p50": h.get_value_at_percentile(50),
        "p90": h.get_value_at_percentile(90),
        "p99": h.get_value_at_percentile(99),
        "p999": h.get_value_at_percentile(99.9),
        "max": h.get_max_value(),
        "hdr": h.encode().decode(),
    }


class StreamSink:
    """Counts deltas as the body arrives, and times them. Deltas that arrive in one read are
    counted with a 1 µs gap: they reached the client together."""

    __slots__ = (
        "capture",
        "deltas",
        "done",
        "ending",
        "final",
        "first",
        "gaps",
        "last",
        "pattern",
        "tail",
        "term",
    )

    def __init__(
        self, patterns: tuple[bytes, bytes], gaps: HdrHistogram, capture: list[bytes] | None
    ) -> None:
        self.pattern, self.term = patterns
        self.gaps = gaps
        self.capture = capture
        self.tail = b""
        self.first: float | None = None
        self.last = 0.0
        self.deltas = 0
        self.done = False
        self.ending: str | None = None
        self.final = b""

    def feed(self, data: bytes, now: float) -> None:
        if self.capture is not None:
            self.capture.append(data)
        self.final = data
        chunk = self.tail + data if self.tail else data
        n = chunk.count(self.pattern)
        if n:
            if self.first is None:
                self.first = now
            else:
                self.gaps.record_value(max(1, int((now - self.last) * 1e6)))
            if n > 1:
                self.gaps.record_value(1, n - 1)
            self.last = now
            self.deltas += n
        if not self.done and self.term in chunk:
            self.done = True
        if self.ending is None:
            for name in _FAILURES:
                if name in chunk:
                    self.ending = name.decode().split(".")[-1]
        self.tail = chunk[-(max(len(self.pattern), len(self.term)) - 1) :]


class Part:
    def __init__(self, spec: dict[str, Any], seed: int) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.port: int = spec["port"]
        self.mode: str = spec["mode"]
        self.count: int = spec["count"]
        self.timeout: float = spec.get("timeout_s", 30.0)
        req = spec["request"]
        self.kind: str = req["kind"]
        self.stream: bool = bool(req.get("stream")) or self.kind == "direct"
        self.patterns = DIRECT_PATTERNS if self.kind == "direct" else APP_PATTERNS
        self.bearer: str | None = spec.get("bearer")
        # A new Idempotency-Key on every send (a client that always sends one).
        self.idempotency: bool = bool(spec.get("idempotency"))
        self.rng = random.Random(seed)
        self.free: list[str] = list(spec.get("conversations", []))
        self._message = req.get("message", "Hello! How are you today?")
        self._path = req.get("path", "/health")
        self._payload = json.dumps(req.get("payload", {})).encode()
        self.latency, self.ttft, self.gaps, self.lag = (
            new_hist(),
            new_hist(),
            new_hist(),
            new_hist(),
        )
        self.statuses: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.sent = self.ok = self.deltas = self.streams_done = 0
        self.start = self.end = 0.0
        self.completions: list[float] | None = [] if spec.get("completions") else None
        self.captured: list[dict[str, Any]] = []
        self._capture_left: int = spec.get("capture", 0)

    def _request(self, i: int) -> tuple[bytes, str | None]:
        port, bearer = self.port, self.bearer
        if self.kind == "send":
            if not self.free:
                raise RuntimeError("no free conversation: raise the seed size or lower load")
            j = self.rng.randrange(len(self.free))
            self.free[j], self.free[-1] = self.free[-1], self.free[j]
            cid = self.free.pop()
            body = json.dumps({"message": f"{self._message} (#{i})", "stream": self.stream})
            path = f"/api/v1/conversations/{cid}/messages"
            key = uuid.uuid4().hex if self.idempotency else None
            data = build_request(
                "POST", LOOPBACK, port, path, body.encode(), bearer=bearer, idempotency_key=key
            )
            return data, cid
        if self.kind == "create":
            path = "/api/v1/conversations"
            return build_request("POST", LOOPBACK, port, path, b"{}", bearer=bearer), None
        if self.kind == "direct":
            path = "/v1/chat/completions"
            return build_request("POST", LOOPBACK, port, path, self._payload, bearer=bearer), None
        return build_request("GET", LOOPBACK, port, self._path, bearer=bearer), None

    async def exchange(self, conn: Connection, i: int, origin: float) -> None:
        """One request on `conn`; latency counts from `origin` (intended or actual send)."""
        data, cid = self._request(i)
        capture: list[bytes] | None = [] if self._capture_left > 0 else None
        sink = StreamSink(self.patterns, self.gaps, capture) if self.stream else None
        sent = time.monotonic()
        self.sent += 1
        response: Response | None = None
        try:
            async with asyncio.timeout(self.timeout):
                response = await conn.send(data, sink)
        except TimeoutError:
            self.errors["timeout"] = self.errors.get("timeout", 0) + 1
            conn.close()
            cid = None  # its turn may still be running: do not reuse the conversation
        except ConnectionError:
            self.errors["connection"] = self.errors.get("connection", 0) + 1
        except asyncio.CancelledError:
            # The job's hard deadline: the request is still counted, as unfinished.
            self.errors["unfinished"] = self.errors.get("unfinished", 0) + 1
            raise
        end = time.monotonic()
        self.end = max(self.end, end)
        if cid is not None:
            self.free.append(cid)
        if response is None:
            return
        status = response.status
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        good = 200 <= status < 300
        body = response.body or (sink.tail + sink.final if sink is not None else b"")
        if not good and (m := _CODE.search(body)) is not None:
            code = m.group(1).decode()
            self.codes[code] = self.codes.get(code, 0) + 1
        if sink is not None and good:
            self.deltas += sink.deltas
            if sink.first is not None:
                self.ttft.record_value(max(1, int((sink.first - sent) * 1e6)))
            good = sink.done
            self.streams_done += sink.done
            if not sink.done:
                key = f"stream {sink.ending or 'ended without a terminal event'}"
                self.errors[key] = self.errors.get(key, 0) + 1
                if (m := _CODE.search(sink.tail + sink.final)) is not None:
                    self.codes[m.group(1).decode()] = self.codes.get(m.group(1).decode(), 0) + 1
        if good:
            self.ok += 1
            self.latency.record_value(max(1, int((end - origin) * 1e6)))
            if self.completions is not None:
                self.completions.append(end)
        if capture is not None:
            self._capture_left -= 1
            self.captured.append(
                {
                    "status": status,
                    "body": b"".join(capture).decode(errors="replace") or response.body.decode(),
                    "sent": sent,
                    "first": sink.first if sink else None,
                    "last": sink.last if sink else None,
                    "deltas": sink.deltas if sink else 0,
                }
            )

    async def run_closed(self, deadline: float) -> None:
        counter = iter(range(self.count))
        stagger = float(self.spec.get("stagger_s", 0.0))
        # A fixed count, capped in time: a slow server ends the phase early, not never.
        if "duration_s" in self.spec:
            deadline = min(deadline, time.monotonic() + stagger + float(self.spec["duration_s"]))

        async def worker(w: int) -> None:
            if stagger:
                await asyncio.sleep(self.rng.uniform(0, stagger))
            conn: Connection | None = None
            try:
                for i in counter:
                    if time.monotonic() > deadline:
                        break
                    if conn is None or conn.closed:
                        conn = await Connection.open(LOOPBACK, self.port)
                    await self.exchange(conn, i, time.monotonic())
            finally:
                if conn is not None:
                    conn.close()

        workers = self.spec["concurrency"]
        if self.kind == "send":
            workers = min(workers, len(self.free))  # never two requests on one conversation
        self.start = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(workers)))

    async def run_open(self, deadline: float) -> None:
        rate = float(self.spec["rate"])
        pool = Pool(LOOPBACK, self.port, self.spec.get("concurrency", 1000))
        await pool.prefill(self.spec.get("prefill", min(64, pool.limit)))
        tasks: set[asyncio.Task[None]] = set()

        pending: dict[int, float] = {}

        async def one(i: int, intended: float) -> None:
            pending[i] = intended
            conn = await pool.acquire()
            try:
                await self.exchange(conn, i, intended)
            finally:
                pool.release(conn)
                del pending[i]

        self.start = t0 = time.monotonic() + 0.02
        for i in range(self.count):
            intended = t0 + i / rate
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now > deadline:
                break
            self.lag.record_value(max(1, int((now - intended) * 1e6)))
            task = asyncio.create_task(one(i, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=max(0.1, deadline - time.monotonic()))
        # Requests still waiting at the deadline keep their place in the histogram, with the
        # time they had waited so far: a lower bound, so the tail is never hidden.
        now = time.monotonic()
        for intended in pending.values():
            self.latency.record_value(max(1, int((now - intended) * 1e6)))
        if pending:
            self.errors["unfinished"] = len(pending)
        for task in tasks:
            task.cancel()
        pool.close()

    def result(self) -> dict[str, Any]:
        wall = max(1e-9, self.end - self.start)
        out: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode,
            "sent": self.sent,
            "ok": self.ok,
            "statuses": self.statuses,
            "codes": self.codes,
            "errors": self.errors,
            "start": self.start,
            "end": self.end,
            "wall_s": wall,
            "rps": self.ok / wall,
            "latency": summary(self.latency),
        }
        if self.mode == "open":
            out["send_lag"] = summary(self.lag)
        if self.stream:
            out |= {
                "deltas": self.deltas,
                "streams_done": self.streams_done,
                "ttft": summary(self.ttft),
                "gap": summary(self.gaps),
            }
        if self.completions is not None:
            out["completions"] = self.completions
        if self.captured:
            out["captured"] = self.captured
        return out


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    cpu_pids: dict[str, list[int]] = job.get("cpu_pids", {})
    parts = [Part(spec, seed=i + job.get("seed", 0)) for i, spec in enumerate(job["parts"])]
    deadline = time.monotonic() + float(job.get("deadline_s", 300))
    server_before = {name: group_cpu(pids) for name, pids in cpu_pids.items()}
    busy_before, _ = machine_busy()
    cpu_before, t0 = _self_cpu(), time.monotonic()
    runs = [p.run_open(deadline) if p.mode == "open" else p.run_closed(deadline) for p in parts]
    try:
        async with asyncio.timeout(max(1.0, deadline - time.monotonic() + 5)):
            await asyncio.gather(*runs)
        timed_out = False
    except TimeoutError:
        timed_out = True
    wall = time.monotonic() - t0
    cpu = _self_cpu() - cpu_before
    busy = machine_busy()[0] - busy_before
    server = {name: group_cpu(pids) - server_before[name] for name, pids in cpu_pids.items()}
    return {
        "t_start": t0,
        "t_end": t0 + wall,
        "wall_s": wall,
        "timed_out": timed_out,
        "loadgen_cpu_s": cpu,
        "loadgen_cores": cpu / max(1e-9, wall),
        "server_cpu_s": server,
        # Every process on the machine, ours included: how crowded the two cores were.
        "machine_busy_cores": busy / max(1e-9, wall),
        "parts": [p.result() for p in parts],
    }


def main() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        uvloop = None
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            result = uvloop.run(run_job(job)) if uvloop else asyncio.run(run_job(job))
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
