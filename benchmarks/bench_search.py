"""PatchCore's nearest-neighbour search: the old kernel against the new ones, on a run's bank.

    python -m benchmarks.bench_search                 # this project's detector, 20 MTD images
    python -m benchmarks.bench_search --run ../mtd-run --n 40 --repeat 3

The queries are the patch features of N images (MTD defect images when the dataset is there,
else the run's demo test images: :func:`benchmarks.bench_predict.pick_images`) made by the run's
detector (``models/detector.pt``); for the default run a 224 x 448 image gives 1,568 queries of
472 dims against a bank of 10,000. Three kernels, single-threaded as each image's search runs in
the detector's pool, interleaved image by image, best of ``--repeat``:

- one product: one matrix product of all queries, then argmin (the kernel before issue 31);
- blocks: one product per block of 128-255 queries, into a reused buffer;
- pruned: blocks, each compared in full only with the bank rows its lower bounds keep
  (:func:`anomalyncd.detect.ops.bank_index`, what PatchCore runs for banks of >= 318 dims).

Prints ms per image of each, the ratios, the share of the bank compared in full, and whether
the distances are the same bits as the one-product kernel's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from anomalyncd import paths
from anomalyncd.detect import load_detector, ops
from anomalyncd.detect.parallel import single_threaded
from anomalyncd.io import read_image
from benchmarks.bench_predict import MTD, ROOT, pick_images


def queries(det, files: list[Path]) -> list[torch.Tensor]:
    """Each image's standardised patch features (h * w, D), laid out as PatchCore searches them."""
    out = []
    for f in files:
        grid = det.patch_grid([read_image(f)])
        out.append((grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]) - det.mean) / det.std)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT, help="a finished project (default: this one)")
    ap.add_argument("--mtd", type=Path, default=MTD)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    det = load_detector(args.run / paths.DETECTOR, device="cpu")
    source, files = pick_images(args.run.resolve(), args.mtd, args.n)
    index = ops.bank_index(det.bank)
    if index is None:
        raise SystemExit(f"a bank of {det.bank.shape[1]} dims: PatchCore does not prune its search")
    kept: list[int] = []
    count = ops.candidates

    def counted(*a):
        keep = count(*a)
        kept.append(len(keep))
        return keep

    ops.candidates = counted
    kernels = {
        "one product": lambda q: ops.nearest_distance_full(q, det.bank),
        "blocks": lambda q: ops.nearest_distance(q, det.bank, det.bank_sq),
        "pruned": lambda q: ops.nearest_distance(q, det.bank, det.bank_sq, index),
    }
    best = {k: [float("inf")] * len(files) for k in kernels}
    same = {k: True for k in kernels}
    with single_threaded(), torch.inference_mode():
        qs = queries(det, files)
        for _ in range(args.repeat):
            for i, q in enumerate(qs):
                ref = None
                for name, fn in kernels.items():
                    t = time.perf_counter()
                    d = fn(q)
                    best[name][i] = min(best[name][i], time.perf_counter() - t)
                    ref = d if ref is None else ref
                    same[name] &= torch.equal(d, ref)
    n_q = sum(len(q) for q in qs) / len(qs)
    print(f"{len(files)} images from {source}: {n_q:.0f} queries per image x bank {tuple(det.bank.shape)}, "
          f"1 thread, best of {args.repeat}; pruning on {index.basis.shape[1]} principal axes + the rest's norm")
    ms = {k: sum(v) / len(v) * 1000 for k, v in best.items()}
    for name in kernels:
        print(f"  {name:<12} {ms[name]:7.1f} ms/image  ({ms['one product'] / ms[name]:.2f}x)  same bits: {same[name]}")
    print(f"  pruned: {sum(kept) / len(kept) / len(det.bank):.1%} of the bank compared in full per block of queries")


if __name__ == "__main__":
    main()
