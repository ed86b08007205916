"""mebin: binarize each anomaly map with MEBin and cut anomaly-centred crops.

Reads the manifest and the 0..255 anomaly maps of ``detect``, takes the set's MEBin search
range, then per image (in parallel): the MEBin threshold and mask, square crop boxes centred on
the anomalies, and the image/mask crops with their scores (``anomalyncd.mebin``). Writes
data/mebin/crops.zarr.zip and metrics/mebin.json, a chunk of images at a time through a part
store; under ``torchrun`` every rank takes a block of the images and rank 0 gathers them.
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

from anomalyncd import mebin, paths, shard
from anomalyncd.config import MebinParams, load_params
from anomalyncd.datasets import Manifest, Record
from anomalyncd.io import InputError, read_mask, write_json
from anomalyncd.regions import region_scores
from anomalyncd.stage import reads, run
from anomalyncd.store import CropSet, MapSet, StoreWriter, read_maps

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: Ground-truth regions of this many pixels or fewer are left out of ``gt_regions_found``.
MIN_GT_REGION = 64
#: Images handed to the workers at a time: bounds what is in memory (maps, crops, masks).
IMAGES_PER_CHUNK = 256
PART_KIND = "crops-part"


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


def _run_job(job: _Job) -> tuple[int, mebin.ImageResult, mebin.Crops, mebin.GtCoverage, float | None]:
    """One image: MEBin, its crops, how much of its ground-truth mask (if any) they hold, and
    how closely MEBin's mask fits it (:func:`mask_iou`)."""
    image = job.record.read()
    if image.shape[:2] != job.size:
        raise InputError(
            f"{job.record.image}: image is {image.shape[1]}x{image.shape[0]} but {paths.MAPS} was made "
            f"for {job.size[1]}x{job.size[0]}; the image changed after detect ran: rerun detect (dvc repro)"
        )
    result, crops = mebin.mebin_image(job.map_u8, image, _SHARED["lo"], _SHARED["hi"], _SHARED["params"])
    gt, iou = mebin.GtCoverage(), None
    if job.record.mask:
        truth = read_mask(job.record.mask, job.size)
        gt = mebin.gt_coverage(truth, crops.boxes, crops.areas, MIN_GT_REGION)
        iou = mask_iou(truth, result.mask)
    return job.index, result, crops, gt, iou


def mask_iou(truth: np.ndarray, mask: np.ndarray) -> float | None:
    """The mean IoU of MEBin's ``mask`` with the true regions (bool (H, W) both) of more than
    MIN_GT_REGION pixels (:func:`anomalyncd.regions.region_scores`), None without such a region.
    Kept per image, like the mask fractions, so that the metric's mean is the same sum in the
    same order whatever the number of processes."""
    ious = region_scores(truth, mask, MIN_GT_REGION).iou
    return float(ious.mean()) if len(ious) else None


def _check_maps(ms: MapSet, records: dict[str, Record]) -> None:
    if not ms.ids:
        raise InputError(f"{paths.MAPS}: holds no anomaly maps; check dataset params and rerun detect")
    missing = [i for i in ms.ids if i not in records]
    if missing:
        raise InputError(f"{paths.MAPS}: image ids not in {paths.MANIFEST}: {missing[:5]}; rerun detect")
    bad = []
    for a in range(0, len(ms.ids), IMAGES_PER_CHUNK):  # a chunk at a time: the maps may be lazy
        chunk = np.asarray(ms.maps[a : a + IMAGES_PER_CHUNK])
        bad += [ms.ids[a + i] for i in np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1))]
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
    ious = [d[4] for d in done]

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
        regions=np.concatenate([c.regions for c in crops]),
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
    metrics = stage_metrics(cs.est_counts, cs.thresholds, [float(m.mean()) for m in cs.masks], len(cs.crops),
                            sum(r.own_range for r in results), coverage, lo, hi, p, ious)
    return cs, metrics


def stage_metrics(est_counts: np.ndarray, thresholds: np.ndarray, mask_fractions: list[float], n_crops: int,
                  own_range: int, coverage: mebin.GtCoverage, lo: int, hi: int, p: MebinParams,
                  mask_ious: list[float | None]) -> dict:
    """metrics/mebin.json from the per-image results (est_counts, thresholds: int (N,); the
    masks' foreground fractions (N,)), the number of crops and of images searched on their own
    range, the summed ground-truth coverage and the images' :func:`mask_iou` (N,)."""
    n = len(est_counts)
    scored = [v for v in mask_ious if v is not None]
    return {
        "images": n,
        "crops": n_crops,
        "crops_per_image": n_crops / n,
        "mean_est_count": float(np.mean(est_counts)),
        "images_without_anomaly": int((np.asarray(est_counts) == 0).sum()),
        "images_on_own_range": int(own_range),
        "lo": lo,
        "hi": hi,
        "mean_threshold": float(np.mean(thresholds)),
        "mean_mask_fraction": float(np.mean(mask_fractions)),
        "erosion": p.erosion,
        # where masks exist, the fractions of ground-truth regions (> MIN_GT_REGION px) found (at
        # least half inside the crops), of those whole inside one crop, and of the defect pixels
        # inside the crops; crops of images without anomaly hold no region
        **coverage.metrics(),
        # and how closely MEBin's mask (the outlines) fits them: the mean over images of mask_iou
        "gt_mask_iou": float(np.mean(scored)) if scored else None,
    }


def streamed_search_range(ms: MapSet) -> tuple[int, int]:
    """:func:`mebin.search_range` of the maps of ``ms``, read a chunk at a time."""
    peaks = [
        np.asarray(ms.maps_u8[a : a + IMAGES_PER_CHUNK]).reshape(-1, ms.maps_u8.shape[1] * ms.maps_u8.shape[2]).max(axis=1)
        for a in range(0, len(ms.ids), IMAGES_PER_CHUNK)
    ]
    return mebin.search_range(np.concatenate(peaks).astype(np.uint8)[:, None, None])


def residual_describer(p: MebinParams):
    """``(describe, dim)``: a function of ``(record, mask (H, W), regions (k, 4))`` giving the
    regions' residual descriptors ``(k, dim)`` with the run's detector (``models/detector.pt``),
    or ``(None, 0)`` when ``mebin.residuals`` is off or the detector has no memory bank."""
    if not p.residuals or not paths.DETECTOR.exists():
        return None, 0
    from anomalyncd.detect import load_detector
    from anomalyncd.residual import pool_regions

    det = load_detector(paths.DETECTOR, "cpu")
    if not det.residual_dim:
        typer.echo(f"mebin: no residual descriptors (the {det.method} detector has no memory bank of normal patches)", err=True)
        return None, 0

    def describe(record: Record, mask: np.ndarray, regions: np.ndarray) -> np.ndarray:
        if not len(regions):
            return np.zeros((0, dim), np.float32)
        return pool_regions(det.residuals(record.read()), mask, regions)

    dim = det.residual_dim
    return describe, dim


def write_part(ms: MapSet, records: dict[str, Record], p: MebinParams, lo: int, hi: int, rows: range, path: Path,
               workers: int, progress: bool = True) -> None:
    """MEBin over the images ``rows`` of ``ms`` into the part store ``path``, a chunk of
    ``IMAGES_PER_CHUNK`` images at a time: the crops store's arrays (``image_index`` and the
    ``masks/<i>`` names counting over the whole set; ``residuals`` with :func:`residual_describer`)
    and, in attrs, the images' ground-truth coverage, mask fractions and how many images fell
    back to their own range (for the metrics)."""
    describe, dim = residual_describer(p)
    coverage, fractions, ious, own = mebin.GtCoverage(), [], [], 0
    bar = tqdm(total=len(rows), desc="mebin", unit="img", disable=not progress)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (lo, hi, p)) if workers > 1 else None
    try:
        with StoreWriter(path, PART_KIND) as w:
            c, t = p.crop_size, len(mebin.sweep_thresholds(p.sample_rate))
            for name, shape, dtype in [("image_sizes", (2,), np.int32), ("thresholds", (), np.int32),
                                       ("est_counts", (), np.int32), ("count_seqs", (t,), np.int32),
                                       ("crops", (c, c, 3), np.uint8), ("crop_masks", (c, c), np.uint8),
                                       ("image_index", (), np.int32), ("boxes", (4,), np.int32), ("regions", (4,), np.int32),
                                       ("areas", (), np.int64), ("scores", (), np.float32)]:
                w.declare(name, shape, dtype)
            if describe is not None:
                w.declare("residuals", (dim,), np.float32)
            _share(lo, hi, p)
            for a in range(rows.start, rows.stop, IMAGES_PER_CHUNK):
                maps_u8 = np.asarray(ms.maps_u8[a : min(a + IMAGES_PER_CHUNK, rows.stop)])
                jobs = [_Job(a + j, m, records[ms.ids[a + j]], tuple(int(v) for v in ms.image_sizes[a + j]))
                        for j, m in enumerate(maps_u8)]
                done = pool.imap(_run_job, jobs, chunksize=max(1, len(jobs) // (workers * 4))) if pool else map(_run_job, jobs)
                for i, result, crops, gt, iou in done:
                    w.append("image_sizes", np.asarray(ms.image_sizes[i : i + 1]))
                    w.append("thresholds", np.array([result.threshold]))
                    w.append("est_counts", np.array([result.est_count]))
                    w.append("count_seqs", result.counts[None])
                    for name in ("crops", "crop_masks", "boxes", "regions", "areas", "scores"):
                        w.append(name, getattr(crops, name))
                    w.append("image_index", np.full(len(crops), i))
                    if describe is not None:
                        w.append("residuals", describe(records[ms.ids[i]], result.map_mask, crops.regions))
                    w.put(f"masks/{i}", result.mask.astype(np.uint8))
                    coverage += gt
                    fractions.append(float(result.mask.mean()))
                    ious.append(iou)
                    own += result.own_range
                    bar.update()
            w.attrs.update(coverage=list(dataclasses.astuple(coverage)), mask_fractions=fractions, mask_ious=ious,
                           own_range=own)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()


def gather_parts(world: int, ids: list[str], attrs: dict, p: MebinParams) -> dict:
    """Write the crops store from the parts of ``world`` ranks (in rank order); return the
    stage's metrics."""
    with shard.Parts(shard.part_paths(paths.CROPS, world), PART_KIND) as parts:
        with StoreWriter(paths.CROPS, "crops", {"ids": list(ids), **attrs}) as w:
            shard.concatenate(parts, w)
        coverage = sum((mebin.GtCoverage(*r.attrs["coverage"]) for r in parts.readers), mebin.GtCoverage())
        fractions = [f for r in parts.readers for f in r.attrs["mask_fractions"]]
        ious = [v for r in parts.readers for v in r.attrs["mask_ious"]]
        est_counts = np.concatenate([r.read("est_counts") for r in parts.readers])
        thresholds = np.concatenate([r.read("thresholds") for r in parts.readers])
        n_crops = parts.rows("image_index")
    return stage_metrics(est_counts, thresholds, fractions, n_crops, sum(int(r.attrs["own_range"]) for r in parts.readers),
                         coverage, attrs["lo"], attrs["hi"], p, ious)


@app.command(cls=reads("mebin", "train.model", "train.image_size", "train.crop_pct", "detect.method", "detect.smooth_sigma"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/mebin/crops.zarr.zip and metrics/mebin.json.

    Under ``torchrun`` each rank takes a block of the images; rank 0 gathers the crops store."""
    p = load_params("mebin", params)
    mebin.check_params(p)
    rank, world, _ = shard.start("cpu")
    records = Manifest.read(paths.MANIFEST).by_id()
    ms = read_maps(paths.MAPS, lazy=True)
    _check_maps(ms, records)
    lo, hi = streamed_search_range(ms)
    shard.clear_parts(paths.CROPS, rank)
    workers = max(1, min((p.workers or os.cpu_count() or 1) // world, len(ms.ids)))
    rows = shard.block(len(ms.ids), rank, world)
    if world > 1:
        typer.echo(shard.describe("mebin", rank, world, rows, "images"), err=True)
    write_part(ms, records, p, lo, hi, rows, shard.part_path(paths.CROPS, rank, world), workers, progress=rank == 0)
    shard.barrier()
    if rank != 0:
        shard.finish()
        return
    attrs = {"method": "mebin", "lo": lo, "hi": hi, "crop_size": p.crop_size, "sample_rate": p.sample_rate,
             "params": dataclasses.asdict(p)}
    try:
        metrics = gather_parts(world, ms.ids, attrs, p)
    finally:
        shard.remove_parts(paths.CROPS)
        shard.finish()
    write_json(paths.METRICS / "mebin.json", metrics)
    typer.echo(
        f"mebin: {metrics['crops']} crops from {metrics['images']} images "
        f"({metrics['images_without_anomaly']} without anomaly), search range "
        f"[{metrics['lo']}, {metrics['hi']}] -> {paths.CROPS}"
    )


if __name__ == "__main__":
    run(app)
