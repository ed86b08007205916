"""How much of MTD's real defects MEBin's crops hold, for each ``mebin.erosion`` rule.

Maps come from one of two places:

- ``synthetic`` (default): each defect image's ground-truth mask becomes a synthetic anomaly
  map: blurred with a Gaussian (sigma 4 px), its peak scaled to a random value in 128..255,
  uniform noise 0..32 added, then every map min-max normalised over the whole set to 0..255
  as ``detect`` does (seeded); ``--map-size`` resizes them as ``detect.map_size`` would;
- a run's map store (``--maps data/detect/maps.zarr.zip`` of a project whose ``detect`` ran
  on MTD): the maps the pipeline really binarizes, e.g. those of ``detect.method=ground_truth``
  or of the default detector.

MEBin then runs with the default params and each erosion rule. Printed per rule: ground-truth
regions (8-connected, larger than 64 px) *found* (at least half of their pixels inside the
crops), regions whose bounding box lies *whole* inside one crop, the fraction of ground-truth
pixels inside the crops, and the images where MEBin found no anomaly. Crops without mask pixels
(the whole-image crop of an image without anomaly) hold no region and count for nothing.

    OMP_NUM_THREADS=1 python -m benchmarks.mtd_mebin_recall --map-size 128
    python -m benchmarks.mtd_mebin_recall --maps /tmp/mtd-gt/data/detect/maps.zarr.zip
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from anomalyncd import mebin
from anomalyncd.config import DatasetParams, MebinParams
from anomalyncd.datasets import read_dataset
from anomalyncd.io import read_mask
from anomalyncd.store import read_maps

MIN_REGION = 64


def synthetic_map(gt: np.ndarray, rng: np.random.Generator, sigma: float = 4.0) -> np.ndarray:
    """float32 (H, W): blurred mask, peak scaled to U(128, 255), plus U(0, 32) noise."""
    m = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), sigma)
    if m.max() > 0:
        m *= rng.uniform(128, 255) / m.max()
    return m + rng.uniform(0, 32, m.shape).astype(np.float32)


def synthetic_maps(gts: list[np.ndarray], seed: int = 0, map_size: int = 0) -> list[np.ndarray]:
    """uint8 maps of the masks ``gts`` (:func:`synthetic_map`), normalised over the set."""
    rng = np.random.default_rng(seed)
    maps = [synthetic_map(gt, rng) for gt in gts]
    lo_f, hi_f = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    maps_u8 = [np.round((m - lo_f) / (hi_f - lo_f) * 255).astype(np.uint8) for m in maps]
    if map_size:
        maps_u8 = [cv2.resize(m, (map_size, map_size), interpolation=cv2.INTER_AREA) for m in maps_u8]
    return maps_u8


def recovery(
    root: Path,
    erosion: str = "keep_thin",
    seed: int = 0,
    map_size: int = 0,
    maps_store: Path | None = None,
    progress: bool = True,
) -> dict:
    """MEBin over MTD's defect images: per defect type ``coverage``
    (:class:`anomalyncd.mebin.GtCoverage`), ``no_anomaly`` images and ``per_type`` images; and
    ``images``, ``crops``, ``lo`` and ``hi``."""
    records = [r for r in read_dataset(DatasetParams(layout="mtd", root=str(root))) if r.split == "test" and r.mask]
    gts = [read_mask(r.mask) for r in tqdm(records, desc="masks", unit="img", disable=not progress)]
    if maps_store is None:
        maps_u8 = synthetic_maps(gts, seed, map_size)
    else:
        ms = read_maps(maps_store)
        index = {i: k for k, i in enumerate(ms.ids)}
        missing = [r.id for r in records if r.id not in index]
        if missing:
            raise SystemExit(f"{maps_store}: no map for {len(missing)} MTD defect images, e.g. {missing[:3]}")
        maps_u8 = [ms.maps_u8[index[r.id]] for r in records]
    # the erosion rule alone: the paper's crop padding and whole-region masks, and no own-range fallback, which would
    # give every image a region whatever the rule
    params = MebinParams(erosion=erosion, crop_size=256, padding=0.1, fallback="none", core=0.0, refine="off")
    lo, hi = mebin.search_range(maps_u8)
    coverage: dict[str, mebin.GtCoverage] = {}
    no_anomaly: dict[str, int] = {}
    per_type: dict[str, int] = {}
    n_crops = 0
    for r, gt, m in tqdm(list(zip(records, gts, maps_u8)), desc=f"mebin {erosion}", unit="img", disable=not progress):
        res, crops = mebin.mebin_image(m, r.read(), lo, hi, params)
        t = r.defect_type
        coverage[t] = coverage.get(t, mebin.GtCoverage()) + mebin.gt_coverage(gt, crops.boxes, crops.areas, MIN_REGION)
        no_anomaly[t] = no_anomaly.get(t, 0) + int(not res.mask.any())
        per_type[t] = per_type.get(t, 0) + 1
        n_crops += len(crops)
    return {"coverage": coverage, "no_anomaly": no_anomaly, "per_type": per_type, "images": len(records), "lo": lo, "hi": hi, "crops": n_crops}


def _line(name: str, c: mebin.GtCoverage, no_anomaly: int, images: int) -> str:
    return (
        f"  {name:10s} regions found {c.found:4d}/{c.regions:4d} ({c.found / max(c.regions, 1):6.1%})  "
        f"whole in a crop {c.whole / max(c.regions, 1):6.1%}  GT pixels in crops {c.pixels_in / max(c.pixels, 1):6.1%}  "
        f"no anomaly {no_anomaly:3d}/{images}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/datasets/mtd", help="the MTD dataset folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--map-size", type=int, default=0, help="synthetic maps: square side; 0: each image's own size")
    ap.add_argument("--maps", type=Path, default=None, help="a run's maps store instead of synthetic maps")
    ap.add_argument("--erosion", nargs="+", default=list(mebin.EROSION_RULES), choices=mebin.EROSION_RULES)
    args = ap.parse_args()
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"{root}: MTD not found; pass --root")

    source = str(args.maps) if args.maps else f"synthetic, {args.map_size or 'native'} px, seed {args.seed}"
    for rule in args.erosion:
        t0 = time.perf_counter()
        res = recovery(root, rule, args.seed, args.map_size, args.maps, progress=False)
        total = sum(res["coverage"].values(), mebin.GtCoverage())
        n_images = res["images"]
        print(f"erosion {rule}: MTD {n_images} defect images, maps {source}, search range "
              f"[{res['lo']}, {res['hi']}], {res['crops']} crops, {time.perf_counter() - t0:.1f} s")
        for t, c in sorted(res["coverage"].items()):
            print(_line(t, c, res["no_anomaly"][t], res["per_type"][t]))
        print(_line("all", total, sum(res["no_anomaly"].values()), n_images))
        print(f"  {dataclasses.asdict(total)}")


if __name__ == "__main__":
    main()
