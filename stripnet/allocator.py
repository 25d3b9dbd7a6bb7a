"""Keep freed tensor memory in the process instead of handing it back to the kernel after every batch.

glibc serves a large allocation (an activation map, a gradient) with its own mmap and unmaps it when it is
freed, and trims the heap's free top back to the kernel. A network that allocates the same sizes every batch
then takes fresh pages, each a page fault and a zeroed page, on every step; on this VM that kernel time was
as large as the arithmetic in a training step (tests/stripnet/test_allocator.py counts the faults; `make
bench --only train` measures it). `keep_freed_memory` raises glibc's mmap and trim thresholds (`mallopt`,
the settings of the `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` environment variables), so the
pages stay mapped and are reused: the price is that the process keeps its peak heap instead of shrinking
after it. `trainer` sets it, and so does the service by default: the eager bf16 runner allocates its maps
afresh every batch too (inspector/settings.py, `keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the heap returns its free top only beyond 2 GiB (mallopt takes an int)
TOP_PAD = 64 << 20  # each time the heap grows, 64 MiB more than asked: fewer brk calls


def keep_freed_memory() -> bool:
    """Set this process's glibc allocator to keep and reuse freed memory; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
