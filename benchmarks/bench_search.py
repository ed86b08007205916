"""PatchCore's nearest-neighbour search, old kernel against new, on synthetic data of MTD size.

    python -m benchmarks.bench_search                    # 1,568 queries x 10,000 bank x 472 dims
    python -m benchmarks.bench_search --queries 784 --repeat 9

One image of the default run: a 224 x 448 image gives a 28 x 56 grid of 472-dim patch features
(Lite0 layers [2, 3, 4]) searched in a bank of 10,000. Queries are bank rows plus noise, laid out
as PatchCore makes them (a permuted feature grid); single-threaded, as each image's search runs
in the detector's pool. Prints the best time of each kernel over ``--repeat`` interleaved runs,
their ratio, and whether the distances are the same bits.
"""

from __future__ import annotations

import argparse
import time

import torch

from anomalyncd.detect.ops import nearest_distance, nearest_distance_full
from anomalyncd.detect.parallel import single_threaded


def synthetic(queries: int, bank_size: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (Q, D), laid out as PatchCore's (a permuted (1, D, 28, Q / 28) grid), and a
    bank (M, D) of non-negative features; each query is a bank row plus noise."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(bank_size, dim, generator=g).abs_()
    q = bank[torch.randint(bank_size, (queries,), generator=g)] + 0.3 * torch.randn(queries, dim, generator=g)
    h = 28 if queries % 28 == 0 else 1
    grid = q.T.reshape(1, dim, h, queries // h).contiguous()
    return grid.permute(0, 2, 3, 1).reshape(-1, dim), bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1568)
    ap.add_argument("--bank", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=472)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    query, bank = synthetic(args.queries, args.bank, args.dim)
    bank_sq = (bank * bank).sum(dim=1)
    kernels = {"old (one product)": lambda: nearest_distance_full(query, bank),
               "new (query blocks)": lambda: nearest_distance(query, bank, bank_sq)}
    times: dict[str, list[float]] = {k: [] for k in kernels}
    out = {}
    with single_threaded(), torch.inference_mode():
        for _ in range(args.repeat):
            for name, fn in kernels.items():
                t = time.perf_counter()
                out[name] = fn()
                times[name].append(time.perf_counter() - t)
    old, new = (min(v) * 1000 for v in times.values())
    a, b = out.values()
    print(f"{args.queries} queries x {args.bank} bank x {args.dim} dims, 1 thread, best of {args.repeat}:")
    for name, v in times.items():
        print(f"  {name:<20} {min(v) * 1000:7.1f} ms")
    print(f"  old / new {old / new:.2f}x; same bits: {torch.equal(a, b)} (max difference {float((a - b).abs().max()):.1e})")


if __name__ == "__main__":
    main()
