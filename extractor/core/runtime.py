"""Process-wide settings for long extraction runs: the memory allocator and torch's thread count.

Every batch allocates and frees tensors of tens of MB ([batch, head, query, key] patterns, their copies and
differences). glibc's malloc serves blocks that large with fresh `mmap` pages and returns them to the system on
`free`, so the next batch pays the page faults again: measured on the 2-core benchmark machine, a layer's
verification took 14–18 ms instead of 3 ms and BERT's own eager layer 103 ms instead of 86 ms. `tune_allocator`
keeps freed memory in the process instead (no mmap for large blocks; trim only beyond 1 GiB). Peak memory is
unchanged; memory freed after the peak is kept for reuse rather than handed back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_tuned = False


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse (glibc only; anything else is left alone). Returns whether it applied.

    Set EXTRACTOR_SYSTEM_MALLOC=1 to keep the system's defaults.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("EXTRACTOR_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _tuned


def configure(threads: int | None = None) -> None:
    """What `extractor run`, its Ray workers and the benchmark's every case start with.

    `threads` caps both torch's intra-op threads and the compiled kernels' (numba) threads."""
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover - numba is a dependency
            pass
