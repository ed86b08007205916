"""Time MEBin's core (threshold sweep, threshold choice, binarization) against a plain loop.

The plain loop below binarizes, erodes (``paper``: as the paper and the authors' code do;
``keep_thin``: also keeping the regions the erosion erases whole) and labels the rescaled map
at every threshold of the sweep, which is how the method is written. The fast path is
``anomalyncd.mebin`` (one erosion per map, labelling only where the foreground changes). Both
must give identical count sequences, thresholds and masks.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_mebin            # 1,000 maps of 256 x 256
    python -m benchmarks.bench_mebin --n 200 --size 128 --erosion paper

Maps: 0 to 3 random filled ellipses, blurred (Gaussian, sigma 4 px), each map's peak scaled to
a random value in 128..255, uniform noise 0..32 added (seeded).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from anomalyncd import mebin


def synthetic_maps(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size) anomaly-map-like arrays."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.uint8)
    for i in range(n):
        m = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(0, 4)):
            cx, cy = (int(v) for v in rng.integers(0, size, 2))
            ax, ay = (int(v) for v in rng.integers(2, max(3, size // 8), 2))
            cv2.ellipse(m, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        m = cv2.GaussianBlur(m, (0, 0), 4)
        if m.max() > 0:
            m *= rng.uniform(128, 255) / m.max()
        m += rng.uniform(0, 32, m.shape).astype(np.float32)
        maps[i] = np.clip(m, 0, 255).astype(np.uint8)
    return maps


def plain_mebin(maps: np.ndarray, sample_rate: int = 4, min_interval_len: int = 4, erosion: str = "keep_thin"):
    """The per-threshold loop: list of (counts, threshold, est_count, mask) per map."""
    peaks = [int(m.max()) for m in maps]
    lo, hi = min(peaks), max(peaks)
    kernel = np.ones((6, 6), np.uint8)
    min_area = max(1, round(36 * (maps.shape[-1] / 256) ** 2))

    def bin_erode(a, t):
        b = np.where(a > t, 255, 0).astype(np.uint8)
        if erosion == "off":
            return b
        eroded = cv2.erode(b, kernel)
        if erosion == "paper":
            return eroded
        n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
        for k in range(1, n):  # keep_thin: regions erased whole, unless they are specks
            region = labels == k
            if not eroded[region].any() and stats[k, cv2.CC_STAT_AREA] >= min_area:
                eroded[region] = 255
        return eroded

    out = []
    for m in maps:
        norm = np.where(m < lo, 0, (m.astype(np.float64) - lo) / (hi - lo) * 255)
        counts = []
        for t in range(255, 0, -sample_rate):
            counts.append(cv2.connectedComponentsWithStats(bin_erode(norm, t), connectivity=8)[0] - 1)
        # maximal runs of equal non-zero counts, at least min_interval_len long
        runs, i = {}, 0
        while i < len(counts):
            j = i
            while j + 1 < len(counts) and counts[j + 1] == counts[i]:
                j += 1
            if counts[i] != 0 and j - i + 1 >= min_interval_len:
                runs.setdefault(counts[i], []).append((i, j))
            i = j + 1
        if runs:
            longest = {c: max(b - a for a, b in rs) for c, rs in runs.items()}
            est = max(longest, key=longest.get)
            last = sorted(runs[est], key=lambda r: r[1] - r[0])[-1][1]
            threshold = int((255 - last * sample_rate) * (hi - lo) / 255 + lo)
        else:
            threshold, est = 255, 0
        out.append((counts, threshold, est, bin_erode(m, threshold) > 0))
    return out


def fast_mebin(maps: np.ndarray, sample_rate: int = 4, min_interval_len: int = 4, erosion: str = "keep_thin"):
    lo, hi = mebin.search_range(maps)
    out = []
    for m in maps:
        counts = mebin.count_sequence(m, lo, hi, sample_rate, erosion)
        threshold, est = mebin.stable_threshold(counts, lo, hi, sample_rate, min_interval_len)
        out.append((counts.tolist(), threshold, est, mebin.binarize(m, threshold, erosion)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of maps")
    ap.add_argument("--size", type=int, default=256, help="map side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--erosion", default="keep_thin", choices=mebin.EROSION_RULES)
    args = ap.parse_args()
    cv2.setNumThreads(1)  # compare single-core work; the stage parallelises over images

    maps = synthetic_maps(args.n, args.size, args.seed)
    print(f"{args.n} maps of {args.size}x{args.size}, search range {mebin.search_range(maps)}, erosion {args.erosion}")
    t0 = time.perf_counter()
    fast = fast_mebin(maps, erosion=args.erosion)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_mebin(maps, erosion=args.erosion)
    t_plain = time.perf_counter() - t0

    same_counts = all(f[0] == p[0] for f, p in zip(fast, plain))
    same_thresholds = all(f[1:3] == p[1:3] for f, p in zip(fast, plain))
    same_masks = all(np.array_equal(f[3], p[3]) for f, p in zip(fast, plain))
    n_anomalous = sum(f[2] > 0 for f in fast)
    print(f"images with an anomaly: {n_anomalous}/{args.n}")
    print(f"plain per-threshold loop: {t_plain:8.3f} s  ({t_plain / args.n * 1e3:.2f} ms/map)")
    print(f"anomalyncd.mebin:         {t_fast:8.3f} s  ({t_fast / args.n * 1e3:.2f} ms/map)")
    print(f"speed-up: {t_plain / t_fast:.1f}x")
    print(f"identical count sequences: {same_counts}; thresholds and counts: {same_thresholds}; masks: {same_masks}")
    if not (same_counts and same_thresholds and same_masks):
        raise SystemExit("MISMATCH between the fast sweep and the plain loop")


if __name__ == "__main__":
    main()
