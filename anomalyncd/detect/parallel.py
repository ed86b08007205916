"""CPU parallelism whose results do not depend on the number of threads.

A multi-threaded torch kernel (a convolution, a matrix product, a sum) splits its work by the
thread count, and with it the order in which floats are added: features then differ in their
last bits between 1 and 2 threads, and the greedy coreset's argmax over ~200,000 near-tied
candidates turns that into another memory bank. Here every unit of work (a batch of images, a
block of rows) runs single-threaded, always cut the same way, and the units run side by side
in a pool of Python threads (torch releases the GIL); results are assembled in their order.
Same inputs, same bits, whatever ``torch.get_num_threads()`` or ``OMP_NUM_THREADS`` says.
On a shared CPU this is also faster than intra-op threads, which wait on each other at every
kernel.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: Rows per block of :func:`row_blocks`: the cut does not depend on the thread count.
BLOCK_ROWS = 65536


@contextmanager
def single_threaded() -> Iterator[int]:
    """Run torch single-threaded inside the block; yields the thread count it had before.

    Once ``torch.set_num_threads`` has been called in a process (here, or by the user), MKL
    inside torch's parallel loops runs nested threads: a batched float64 ``torch.linalg.inv``
    on 2 threads then stalls (torch 2.14, MKL 2024.2). Such calls belong in this block too.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


def pool_size(device: torch.device | str = "cpu") -> int:
    """Workers for :func:`ordered_map`: torch's thread count on CPU, 1 on an accelerator."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 2) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed single-threaded by ``workers`` threads.

    At most ``workers * ahead`` results wait unconsumed (bounded memory). With one worker the
    items are computed in this thread, still single-threaded: the same results either way.
    The pool's threads are started while torch is set to one thread, so that is their setting
    too (torch reads it when a thread first runs a kernel; calling ``torch.set_num_threads``
    from the workers themselves can deadlock MKL later).
    """
    with single_threaded():
        if workers <= 1:
            for item in items:
                yield fn(item)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="anomalyncd-detect") as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers * ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def row_blocks(n: int, rows: int = BLOCK_ROWS) -> list[slice]:
    """Slices of ``rows`` rows covering ``range(n)`` (the last one shorter)."""
    return [slice(a, min(a + rows, n)) for a in range(0, n, rows)]


def blocked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, workers: int) -> torch.Tensor:
    """``fn`` applied row-block by row-block to ``x`` (N, ...) and concatenated: ``fn(x)`` for a
    row-wise ``fn`` (a product ``x @ w``, a row norm), the same bits for any ``workers``."""
    if len(x) == 0:
        return fn(x)
    return torch.cat(list(ordered_map(lambda s: fn(x[s]), row_blocks(len(x)), workers)))
