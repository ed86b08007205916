"""Which crop features group defects by type: k-means on the classifier's frozen features (the
run's ``baseline``) against k-means on the detector's residual descriptors of the same crops
(:mod:`anomalyncd.residual`), and on both.

    python -m benchmarks.bench_residual --run <project> [--detector <models/detector.pt of a patchcore run>]

``--run``: a finished project (``mebin``, ``infer`` and ``merge`` done; the manifest with the
true types). ``--detector``: the PatchCore detector whose bank gives the residuals (default:
the run's own; for a run whose maps came from ``ground_truth`` or another method, a PatchCore
detector fitted on the same data set's normal images). Every figure is the evaluate stage's
baseline protocol (``stages.evaluate.baseline_metrics``: standardise, PCA, k-means into the
run's number of classes, merged to images as the run merges, mean of 5 k-means seeds): image
and crop NMI / ARI / F1. The descriptors are cached in ``--cache`` (an ``.npz``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm


def descriptors(run: Path, detector: Path) -> np.ndarray:
    """float32 (M, D): the residual descriptor of every crop of the run's crops store."""
    from anomalyncd import paths
    from anomalyncd.datasets import Manifest
    from anomalyncd.detect import load_detector
    from anomalyncd.detect.parallel import single_threaded
    from anomalyncd.residual import pool_regions
    from anomalyncd.store import read_crops

    cs = read_crops(run / paths.CROPS)
    records = Manifest.read(run / paths.MANIFEST).by_id()
    det = load_detector(detector, "cpu")
    if not det.residual_dim:
        raise SystemExit(f"{detector}: a {det.method} detector has no memory bank; give a patchcore detector with --detector")
    out = np.zeros((len(cs.crops), det.residual_dim), np.float32)
    with single_threaded():
        for i, iid in enumerate(tqdm(cs.ids, desc="residuals", unit="img")):
            rows = np.flatnonzero(cs.image_index == i)
            if len(rows):
                out[rows] = pool_regions(det.residuals(records[iid].read()), cs.masks[i], cs.regions[rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--detector", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="npz of the descriptors (written if missing)")
    args = ap.parse_args()
    run = args.run.resolve()
    detector = (args.detector or run / "models/detector.pt").resolve()
    cache = args.cache.resolve() if args.cache else None
    if cache and cache.exists():
        res = np.load(cache)["residual"]
    else:
        res = descriptors(run, detector)
        if cache:
            np.savez(cache, residual=res)
    os.chdir(run)
    from anomalyncd import paths
    from anomalyncd.datasets import Manifest
    from anomalyncd.merge import Merger
    from anomalyncd.store import read_crops, read_merged, read_probs
    from stages.evaluate import baseline_metrics

    cs, ps = read_crops(paths.CROPS), read_probs(paths.PROBS)
    merger = Merger.from_attrs(read_merged(paths.MERGED).attrs, str(paths.MERGED))
    records = Manifest.read(paths.MANIFEST).by_id()
    base = ps.baseline_features.astype(np.float64)
    unit = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
    print(f"{run}: {len(cs.crops)} crops of {len(cs.ids)} images; residuals of {detector}")
    print(f"{'features':<44} {'image NMI / ARI / F1':>22} {'crop NMI / ARI / F1':>22}")
    for name, feats in (
        ("classifier's frozen features (baseline)", base),
        ("detector residual descriptors", res),
        ("both (each unit length)", np.hstack([unit, res])),
    ):
        m = baseline_metrics(cs, dataclasses.replace(ps, baseline_features=np.asarray(feats, np.float32)), merger, 0, records)
        trio = lambda d: " / ".join(f"{d[k]:.3f}" for k in ("nmi", "ari", "f1"))  # noqa: E731
        print(f"{name:<44} {trio(m['image']):>22} {trio(m['crop']):>22}")


if __name__ == "__main__":
    main()
