"""CPU time and memory of processes, read from /proc.

CPU is utime + stime from `/proc/<pid>/stat` (clock ticks, all threads of the process), summed
over a process and its descendants, so a multi-worker uvicorn counts its workers. RSS comes
from `/proc/<pid>/statm`. Machine-wide busy time comes from `/proc/stat`, to tell how much of
the box other people's work took during a phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError):
        return 0


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def group_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def group_rss(pids: list[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(v) for v in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass
class Sample:
    t: float
    cpu: dict[str, float]
    rss: dict[str, int]


@dataclass
class Sampler:
    """Samples the CPU and RSS of named process groups every `interval` seconds, in the
    background, for at most `limit` samples."""

    groups: dict[str, list[int]]
    interval: float = 0.25
    limit: int = 20_000
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> Sample:
        s = Sample(
            time.monotonic(),
            {name: group_cpu(pids) for name, pids in self.groups.items()},
            {name: group_rss(pids) for name, pids in self.groups.items()},
        )
        self.samples.append(s)
        return s

    async def _loop(self) -> None:
        while len(self.samples) < self.limit:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def cpu_rate(self, name: str, start: float, end: float) -> float:
        """Average cores used by group `name` between two monotonic times."""
        inside = [s for s in self.samples if start <= s.t <= end]
        if len(inside) < 2:
            return 0.0
        first, last = inside[0], inside[-1]
        return (last.cpu[name] - first.cpu[name]) / max(1e-9, last.t - first.t)

    def max_rss(self, name: str, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.rss[name] for s in self.samples if start <= s.t <= end), default=0)
