"""Handing memory back to the system once a burst of work is over."""

from __future__ import annotations

import ctypes
import functools
import gc


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
