"""Giving freed heap memory back to the operating system after a batch (glibc only).

A long-running server allocates the transient tensors of each batch (encoder activations, the
samples of up to ``max_batch`` photos) in its worker thread, and decodes uploads in a pool of
threads. glibc keeps memory freed by these threads in per-thread arenas, and once a large block
has been freed it serves later blocks of up to 32 MiB from those arenas instead of fresh
mappings; the freed memory then stays resident. ``malloc_trim(0)`` returns the free pages of
every arena to the system. ``GLOBEFLOW_MALLOC_TRIM=0`` switches this off (the soak benchmark's
baseline, ``benchmarks/server_soak.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

__all__ = ["release_free_heap"]


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` or ``None`` (musl, macOS, Windows, or switched off)."""
    if os.environ.get("GLOBEFLOW_MALLOC_TRIM", "1") == "0":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return freed heap pages to the system; ``False`` where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
