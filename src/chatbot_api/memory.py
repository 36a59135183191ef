"""The process's heap: kept out of the collector's way once started, and handed back to the
system once a burst of work is over."""

from __future__ import annotations

import ctypes
import functools
import gc


def freeze_startup_heap() -> None:
    """Move every object alive now (the imported modules, the app) out of the collector's
    reach (`gc.freeze`), after one full collection.

    A full collection walks every tracked object, and the imports alone leave about 115,000
    that live as long as the process: each full collection then took 70-130 ms here, a stall
    for every request and stream in the process. Frozen, they are never walked again, and a
    full collection under load takes 4-8 ms. Garbage among the frozen objects is never
    collected, so this runs once, on a server process's start, not per app (tests build
    hundreds)."""
    gc.collect()
    gc.freeze()


def release_freed_memory() -> None:
    """Collect, then have glibc hand its free heap pages back to the system (`malloc_trim`),
    so the RSS falls back near idle rather than staying at the burst's peak. Elsewhere
    (musl, macOS) only the collection runs."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to open
        return None
