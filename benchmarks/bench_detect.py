"""Detector speed, peak memory and quality on MTD (Magnetic Tile Defect).

    # images per second and peak memory of each built-in detector on 200 MTD test images
    OMP_NUM_THREADS=2 python benchmarks/bench_detect.py speed

    # image AUROC, pixel AUROC and AUPRO on MTD (761 normal training images, 583 test images)
    OMP_NUM_THREADS=2 python benchmarks/bench_detect.py quality --set method=patchcore
    OMP_NUM_THREADS=2 python benchmarks/bench_detect.py quality --set method=musc \
        --set backbone=vit_small_patch16_224 --set layers=[5,8,11] --set image_size=224

``--set key=value`` overrides a ``detect`` param (values parsed as YAML); the defaults are
those of ``params.yaml``. Each detector runs in its own process so peak memory is its own.
Metrics are computed at ``detect.map_size`` over all 583 test images (392 defective, 191
normal), exactly as the detect stage computes them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomalyncd.config import DatasetParams, DetectParams, from_dict, load_params  # noqa: E402
from anomalyncd.datasets import build_manifest, read_dataset  # noqa: E402
from anomalyncd.detect import DetectContext, LazyImages, create_detector  # noqa: E402
from anomalyncd.detect.metrics import detection_metrics, resize_masks  # noqa: E402
from anomalyncd.detect.holdout import split_holdout  # noqa: E402
from anomalyncd.image_score import ImageScore, top_means  # noqa: E402
from anomalyncd.io import read_mask  # noqa: E402

MTD = ROOT.parent / "shared" / "datasets" / "mtd"


def extract_code(ref: str, dest: Path) -> None:
    """This repository's ``anomalyncd`` package as of git ``ref``, written under ``dest`` (for
    benchmarks that run another version's code beside this one's)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "anomalyncd"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"--ref {ref}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def mtd_manifest(root: Path):
    if not root.is_dir():
        sys.exit(f"MTD not found at {root}; pass --mtd")
    return build_manifest(read_dataset(DatasetParams(layout="mtd", root=str(root))), progress=False)


def detect_params(overrides: list[str]) -> DetectParams:
    base = asdict(load_params("detect", ROOT / "params.yaml"))
    for item in overrides:
        key, _, value = item.partition("=")
        base[key] = yaml.safe_load(value)
    return from_dict(DetectParams, base, where="--set")


def _run(p: DetectParams, train, records, root: str, queue) -> None:
    """Fit and map in this process, holding back ``detect.holdout`` of ``train`` as the stage
    does; report seconds, peak RSS, the maps and the image score the stage would make."""
    start = time.perf_counter()
    det = create_detector(p, DetectContext(dataset_root=root))
    held = []
    if det.needs_training_images:
        fit_idx, held_idx = split_holdout(len(train), p.holdout, p.seed)
        held = [train[i] for i in held_idx]
        det.fit(LazyImages([train[i].image for i in fit_idx]))
    fitted = time.perf_counter()
    maps, scored = det.map_records_scored(records)
    done = time.perf_counter()
    reference = top_means(det.map_records_scored(held)[1], p.score_tops) if held else np.zeros((0, len(p.score_tops)))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"fit_s": fitted - start, "map_s": done - fitted, "peak_mb": peak_mb, "weights": det.weights, "maps": maps, "scored": scored,
               "fit_images": len(train) - len(held), "score": ImageScore.fit(p.score_tops, reference)})


def run_isolated(p: DetectParams, train, records, root: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_run, args=(p, train, records, root, q))
    proc.start()
    out = q.get()
    proc.join()
    return out


def speed(args) -> None:
    man = mtd_manifest(args.mtd)
    test = [r for r in man.records if r.split == "test"]
    pick = np.random.default_rng(0).choice(len(test), min(args.images, len(test)), replace=False)
    records = [test[i] for i in sorted(pick)]
    train = man.train_normal()
    base = detect_params(args.set)
    print(f"{len(records)} MTD test images, map_size {base.map_size}, image_size {base.image_size}, "
          f"train_images {base.train_images or len(train)}")
    print(f"{'detector':<40} {'fit s':>8} {'map s':>8} {'img/s':>8} {'peak MB':>8}")
    for method in ("patchcore", "padim", "musc", "ground_truth"):
        p = replace(base, method=method)
        r = run_isolated(p, train, records, str(args.mtd))
        name = f"{method} ({p.backbone})" if method != "ground_truth" else method
        print(f"{name:<40} {r['fit_s']:8.1f} {r['map_s']:8.1f} {len(records) / r['map_s']:8.1f} {r['peak_mb']:8.0f}",
              flush=True)


def quality(args) -> None:
    man = mtd_manifest(args.mtd)
    records = [r for r in man.records if r.split == "test"]
    p = detect_params(args.set)
    r = run_isolated(p, man.train_normal(), records, str(args.mtd))
    maps = r["maps"]
    masks = resize_masks([read_mask(x.mask) if x.mask else np.zeros((x.height, x.width), bool) for x in records],
                         p.map_size)
    labels = np.array([not x.is_normal for x in records])
    scores = r["score"](r["scored"])  # as the detect stage scores images (from its score maps)
    m = detection_metrics(maps, scores, masks, labels)
    per_type = {}
    for t in sorted({x.defect_type for x in records} - {"good"}):
        keep = np.array([x.defect_type in (t, "good") for x in records])
        per_type[t] = round(detection_metrics(maps[keep], scores[keep], masks[keep],
                                              labels[keep])["pixel_auroc"], 3)
    out = {
        "method": p.method, "backbone": p.backbone, "layers": p.layers, "weights": r["weights"],
        "image_size": p.image_size, "map_size": p.map_size, "train_images": p.train_images,
        "bank_size": p.bank_size, "fit_images": r["fit_images"], "test_images": len(records),
        **{k: round(v, 4) for k, v in m.items()}, "pixel_auroc_per_type": per_type,
        "fit_s": round(r["fit_s"], 1), "map_s": round(r["map_s"], 1), "peak_mb": round(r["peak_mb"]),
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "quality"])
    ap.add_argument("--mtd", type=Path, default=MTD, help="MTD dataset root")
    ap.add_argument("--set", action="append", default=[], help="detect param override key=value")
    ap.add_argument("--images", type=int, default=200, help="speed: number of test images")
    args = ap.parse_args()
    speed(args) if args.mode == "speed" else quality(args)


if __name__ == "__main__":
    main()
