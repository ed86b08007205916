"""The C heap of a process that runs several torch threads over images of many sizes.

glibc's ``malloc`` gives each thread that allocates its own arena (up to 8 per core). A thread
keeps the memory it freed in its arena for its next request, so two detector threads, each
freeing the activations of one image before the next image of another size, each hold a
fragmented high-water mark that the other thread cannot reuse. With one arena the threads reuse
each other's freed blocks: ``anomalyncd predict`` on 40 MTD images peaked at 1.40-1.43 GB
instead of 1.51-1.58 GB, in the same time (``benchmarks/bench_predict.py``, issue 31). Large
tensors are allocated rarely, so the one lock is not contended.
"""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def share_one_arena() -> bool:
    """Let every thread of this process that allocates from now on share glibc's main arena.

    Call it before the worker threads start (threads that already have an arena keep it). A
    ``MALLOC_ARENA_MAX`` the user set is left alone. Returns whether the setting was made
    (False on a C library without glibc's ``mallopt``, e.g. macOS or musl: nothing changes).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, 1) == 1
