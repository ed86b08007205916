"""mebin: binarize each anomaly map with MEBin and cut anomaly-centred crops.

Reads the manifest and the 0..255 anomaly maps of ``detect``, takes the set's MEBin search
range, then per image (in parallel): the MEBin threshold and mask, square crop boxes centred on
the anomalies, and the image/mask crops with their scores (``anomalyncd.mebin``). Writes
data/mebin/crops.zarr.zip and metrics/mebin.json.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import typer
from tqdm import tqdm

from anomalyncd import mebin, paths
from anomalyncd.config import MebinParams, load_params
from anomalyncd.datasets import Manifest, Record
from anomalyncd.io import InputError, read_image, read_mask, write_json
from anomalyncd.stage import run
from anomalyncd.store import CropSet, MapSet, read_maps, write_crops

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: Ground-truth regions of this many pixels or fewer are left out of ``gt_regions_found``.
MIN_GT_REGION = 64


@dataclasses.dataclass
class _Job:
    index: int
    map_u8: np.ndarray
    record: Record
    size: tuple[int, int]  # (H, W) the maps store recorded for the image


_SHARED: dict[str, Any] = {}


def _share(lo: int, hi: int, params: MebinParams) -> None:
    _SHARED.update(lo=lo, hi=hi, params=params)


def _init_worker(lo: int, hi: int, params: MebinParams) -> None:
    cv2.setNumThreads(1)  # one process per core already
    _share(lo, hi, params)


def _run_job(job: _Job) -> tuple[int, mebin.ImageResult, mebin.Crops, mebin.GtCoverage]:
    """One image: MEBin, its crops and how much of its ground-truth mask (if any) they hold."""
    image = read_image(job.record.image)
    if image.shape[:2] != job.size:
        raise InputError(
            f"{job.record.image}: image is {image.shape[1]}x{image.shape[0]} but {paths.MAPS} was made "
            f"for {job.size[1]}x{job.size[0]}; the image changed after detect ran: rerun detect (dvc repro)"
        )
    result, crops = mebin.mebin_image(job.map_u8, image, _SHARED["lo"], _SHARED["hi"], _SHARED["params"])
    gt = mebin.GtCoverage()
    if job.record.mask:
        gt = mebin.gt_coverage(read_mask(job.record.mask, job.size), crops.boxes, crops.areas, MIN_GT_REGION)
    return job.index, result, crops, gt


def _check_maps(ms: MapSet, records: dict[str, Record]) -> None:
    if not ms.ids:
        raise InputError(f"{paths.MAPS}: holds no anomaly maps; check dataset params and rerun detect")
    missing = [i for i in ms.ids if i not in records]
    if missing:
        raise InputError(f"{paths.MAPS}: image ids not in {paths.MANIFEST}: {missing[:5]}; rerun detect")
    bad = [ms.ids[i] for i in np.flatnonzero(~np.isfinite(ms.maps.reshape(len(ms.ids), -1)).all(axis=1))]
    if bad:
        raise InputError(
            f"{paths.MAPS}: anomaly maps contain NaN or infinite values for {len(bad)} image(s), "
            f"e.g. {bad[:3]}; fix the detector's output and rerun detect"
        )


def build_crops(ms: MapSet, records: dict[str, Record], p: MebinParams, progress: bool = True) -> tuple[CropSet, dict]:
    """MEBin over every map of ``ms`` (images looked up in ``records`` by id): the crop set and
    the stage's metrics."""
    mebin.check_params(p)
    _check_maps(ms, records)
    lo, hi = mebin.search_range(ms.maps_u8)
    jobs = [
        _Job(i, ms.maps_u8[i], records[iid], (int(ms.image_sizes[i][0]), int(ms.image_sizes[i][1])))
        for i, iid in enumerate(ms.ids)
    ]
    workers = min(p.workers or os.cpu_count() or 1, len(jobs))
    bar = dict(total=len(jobs), desc="mebin", unit="img", disable=not progress)
    if workers <= 1:
        _share(lo, hi, p)
        done = list(tqdm(map(_run_job, jobs), **bar))
    else:
        # spawn, not fork: forking a process that already runs threads (OpenCV, zarr) can deadlock
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (lo, hi, p)) as pool:
            chunk = max(1, len(jobs) // (workers * 8))
            done = list(tqdm(pool.imap(_run_job, jobs, chunksize=chunk), **bar))
    done.sort(key=lambda d: d[0])
    results = [d[1] for d in done]
    crops = [d[2] for d in done]
    coverage = sum((d[3] for d in done), mebin.GtCoverage())

    cs = CropSet(
        ids=list(ms.ids),
        image_sizes=np.asarray(ms.image_sizes, np.int32),
        thresholds=np.array([r.threshold for r in results], np.int32),
        est_counts=np.array([r.est_count for r in results], np.int32),
        # every sequence has T = len(sweep_thresholds(sample_rate)) entries: no padding needed
        count_seqs=np.stack([r.counts for r in results]).astype(np.int32),
        masks=[r.mask for r in results],
        crops=np.concatenate([c.crops for c in crops]),
        crop_masks=np.concatenate([c.crop_masks for c in crops]),
        image_index=np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(crops)]),
        boxes=np.concatenate([c.boxes for c in crops]),
        areas=np.concatenate([c.areas for c in crops]),
        scores=np.concatenate([c.scores for c in crops]),
        attrs={
            "method": "mebin",
            "lo": lo,
            "hi": hi,
            "crop_size": p.crop_size,
            "sample_rate": p.sample_rate,
            "params": dataclasses.asdict(p),
        },
    )
    n = len(cs.ids)
    metrics = {
        "images": n,
        "crops": len(cs.crops),
        "crops_per_image": len(cs.crops) / n,
        "mean_est_count": float(cs.est_counts.mean()),
        "images_without_anomaly": int((cs.est_counts == 0).sum()),
        "lo": lo,
        "hi": hi,
        "mean_threshold": float(cs.thresholds.mean()),
        "mean_mask_fraction": float(np.mean([m.mean() for m in cs.masks])),
        "erosion": p.erosion,
        # where masks exist, the fractions of ground-truth regions (> MIN_GT_REGION px) found (at
        # least half inside the crops), of those whole inside one crop, and of the defect pixels
        # inside the crops; crops of images without anomaly hold no region
        **coverage.metrics(),
    }
    return cs, metrics


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/mebin/crops.zarr.zip and metrics/mebin.json."""
    p = load_params("mebin", params)
    records = Manifest.read(paths.MANIFEST).by_id()
    cs, metrics = build_crops(read_maps(paths.MAPS), records, p)
    write_crops(paths.CROPS, cs)
    write_json(paths.METRICS / "mebin.json", metrics)
    typer.echo(
        f"mebin: {metrics['crops']} crops from {metrics['images']} images "
        f"({metrics['images_without_anomaly']} without anomaly), search range "
        f"[{metrics['lo']}, {metrics['hi']}] -> {paths.CROPS}"
    )


if __name__ == "__main__":
    run(app)
