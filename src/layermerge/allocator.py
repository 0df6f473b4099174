"""Keep freed memory in the process while coefficients are trained, so each step reuses the last one's.

A training step allocates and frees the same large tensors every time (activations, their gradients,
W(λ), λ's gradient). glibc's malloc gives freed memory back to the kernel once more than its trim
threshold lies free at the top of its heap (it adapts the threshold to the blocks a process frees, to
at most 64 MiB), and serves blocks above its mmap threshold (adapted likewise, to at most 32 MiB) from
fresh mappings; either way the next step's allocation faults every page in again, zero-filled by the
kernel, at about 2 µs a page on this project's VM. That was 17,439 faults per forward + backward of
EfficientNet-Lite0's blocks on 64 images, 1 with the memory kept (docs/BENCHMARKS.md, "ProDistill,
faster", item 15).

``keep_freed_memory()`` fixes, while the context is open, the mmap threshold at glibc's largest
adaptive value (32 MiB) and the trim threshold at ``KEPT_BYTES`` (256 MiB): a step's freed blocks stay
for the next step. On leaving, the trim threshold goes to glibc's largest adaptive value (64 MiB) and
the heap is trimmed once. Blocks above 32 MiB are mapped and unmapped as before, so a heap that
fragments cannot hold more than ``KEPT_BYTES`` of free memory at its top beyond what glibc keeps
anyway. Nothing changes with another C library or allocator, or when the user set glibc's malloc
options themselves (``MALLOC_*_`` or ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading

# mallopt(3) parameters, and glibc's largest adaptive thresholds (malloc/malloc.c)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024
STEADY_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
KEPT_BYTES = 256 * 1024 * 1024           # free memory kept at the heap's top while training

_depth = 0
_lock = threading.Lock()


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's glibc when malloc is glibc's and the user left its options alone, else None."""
    if not sys.platform.startswith("linux"):
        return None
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return None
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):      # not glibc (musl, another platform's libc)
        return None


@contextlib.contextmanager
def keep_freed_memory():
    """Within the context, freed memory stays in the process for the next allocation (see the module);
    nested uses keep it until the outermost one ends."""
    global _depth
    libc = glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
                libc.malloc_trim(0)
