"""Keeps freed host memory in the process for reuse, so XLA:CPU's per-call buffers stop costing page faults.

XLA:CPU allocates every call's temporaries afresh, hundreds of MB per U-Net training step, from its worker threads.
glibc's malloc serves a block that large from a fresh kernel mapping and unmaps it when it is freed (a thread's
own arena cannot hold more than 64 MiB), so the next step faults every 4 KiB page back in: about 194,000 page
faults per step of the 6.5M-parameter benchmark net on 2 cores, a fifth of its CPU time in the kernel.
`keep_freed_memory()` makes every thread allocate from the one main heap, never from a private mapping, and
stops malloc from returning that heap's free top to the kernel. After the first steps a training step takes no
page faults at all: 0.98 -> 0.80 s for that net (docs/performance.md). The price is that the process keeps its peak
host memory until it exits, which a training or sampling run does anyway.

train.py and sample.py call it on the CPU backend before JAX starts (--nokeep_host_memory: don't); the library
never does. In a notebook, call it before using JAX. Standard library only, and a no-op on a C library other than
glibc.
"""
from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):
    return False


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc as above; returns whether it did (False: not glibc)."""
  if not is_glibc():
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
