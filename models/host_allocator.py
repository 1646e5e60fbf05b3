"""Keep freed activation memory in the process instead of handing it back to the OS (glibc).

A CPU forward allocates and frees its activations on every call: one verification of sixteen
8-node trees on the tiny target makes tensors of up to ~1.2 MB (144 rows x 2048), a prompt step
larger ones. glibc's malloc gives the top of its heap back to the OS once more than its trim
threshold lies free there, and serves blocks above its mmap threshold from fresh mappings; both
thresholds drift with the allocation history. Every page handed back is a page fault (zeroed by
the kernel) when the next forward touches it again. Measured on this project's 2-core machine:
1,000-5,000 minor faults per packed verification of sixteen 8-node trees, which took 25-31 ms
depending on where the thresholds had drifted, and ~130,000 faults per pass of the 16-user
closed loop (``benchmarks/concurrency``). With freed memory kept (:func:`keep_freed_memory`):
~40 faults and 24-25 ms, and ~2,500 faults a pass.

The price: the process's resident memory stays at its high-water mark of activations, as with
jemalloc or tcmalloc, which CPU inference stacks often preload for the same reason. Processes
whose C library is not glibc (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = (
    (M_TRIM_THRESHOLD, 1 << 30),  # give the heap's top back only past 1 GiB free
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time (untouched pages cost nothing)
    (M_MMAP_THRESHOLD, 32 << 20),  # blocks up to 32 MiB (glibc's maximum) come from the heap
)

_applied: bool | None = None


def on_glibc() -> bool:
    """Whether this process's C library is glibc (whose ``mallopt`` this module calls)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once per process); True if it did.
    Setting any of these turns off glibc's own drifting of the thresholds."""
    global _applied
    if _applied is None:
        _applied = on_glibc() and _mallopt()
    return _applied


def _mallopt() -> bool:
    libc = ctypes.CDLL(None)  # the symbols the process already has: glibc's malloc
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
