"""CPU inference: keep freed memory in the process heap instead of handing it back to the OS.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A CPU forward pass over a large image
allocates and frees such blocks all the time (one 4-channel activation of a 1792x1792 VAE
decoder tile is 49 MiB), so every layer's output is built on new pages that the kernel first
has to fault in and zero. Measured on the tiny stand-in (issue 13.11,
``python benchmarks/bench_tiny_standin.py --lr 448x640 --layouts fast``, 1 thread): the VAE decode
of a 1792x2560 output took 6.1 CPU s with glibc's default and 3.0 s inside
:func:`reuse_freed_memory` (1.07 M vs 0.19 M page faults in the whole call, 10.9 vs 7.6 CPU s).
The arithmetic is untouched, so outputs are bit-identical.

:func:`reuse_freed_memory` sets ``M_MMAP_MAX = 0`` (every block comes from the heap, freed
blocks are reused) and a 1 GiB ``M_TRIM_THRESHOLD`` (the heap is not shrunk after every large
free) for the duration of a call, then restores glibc's defaults (mmap for blocks above the
threshold, trim threshold 128 KiB) and returns the free heap to the OS (``malloc_trim``).
Process-wide and nestable; a no-op where the C library is not glibc (macOS, Windows, musl) or
when the environment variable ``DALPSR_CPU_MALLOC`` is ``default``. The denoising loop wraps
every call on a CPU device in it (dalpsr/pipelines/loop.py).
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc malloc.h)
M_MMAP_MAX = -4
#: glibc's defaults, restored on exit (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
GLIBC_MMAP_MAX = 65536
GLIBC_TRIM_THRESHOLD = 128 * 1024
#: heap kept after a free inside the context (a whole 2560x1792 pass fits)
KEEP_BYTES = 1 << 30
ENV = 'DALPSR_CPU_MALLOC'

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_probed = False


def glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc (with ``mallopt`` and ``malloc_trim``), or None elsewhere."""
    global _libc, _probed
    if not _probed:
        _probed = True
        try:
            lib = ctypes.CDLL(None)
            lib.gnu_get_libc_version.restype = ctypes.c_char_p
            lib.gnu_get_libc_version()
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError, TypeError):
            _libc = None
    return _libc


def active() -> bool:
    """Whether a :func:`reuse_freed_memory` context is open now (in any thread)."""
    return _depth > 0


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside: freed heap memory is reused instead of unmapped (module doc). Yields whether the
    setting is in effect (False: not glibc, ``enabled`` False or ``DALPSR_CPU_MALLOC=default``)."""
    global _depth
    lib = glibc() if enabled and os.environ.get(ENV, '').lower() != 'default' else None
    if lib is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            lib.mallopt(M_MMAP_MAX, 0)
            lib.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
                lib.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                lib.malloc_trim(0)


__all__ = ['reuse_freed_memory', 'active', 'glibc', 'ENV']
