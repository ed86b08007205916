"""detect: one anomaly map per image to classify, from the detector named by detect.method.

Writes the maps store (raw maps, 0..255 maps over the global min-max of the set, image scores:
``anomalyncd.image_score`` over ``detect.score_tops``), the fitted detector (``models/detector.pt``, for ``anomalyncd predict``) and,
where the dataset has ground truth, image AUROC, pixel AUROC and AUPRO with a PNG grid.

Metrics need normal images too: the normal test images that are not classified
(``dataset.include_normal: false``) are mapped as well, for the metrics only; they are not in
the store. For ``musc`` they join the set of images that score each other.

``patchcore`` and ``padim`` fit on the normal training images less a share ``detect.holdout``
held back (drawn with ``detect.seed``): those are mapped after the fit; they are the image
score's reference (its per-area median and spread, attrs ``image_score``), and their own scores
(each on the others) are stored in the maps store's attrs (``holdout_scores``), for the ``calibrate`` stage's
normal/defect threshold. They are in no fit and no metric.

Maps are made a chunk of images at a time into a part store and gathered into the maps store
(``anomalyncd.detect.stream``); under ``torchrun`` every rank maps a block of whole batches
with the detector fitted once on rank 0, and rank 0 gathers (``anomalyncd.shard``).
"""

import time
from pathlib import Path

import cv2
import numpy as np
import typer

from anomalyncd import paths, shard
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest, Record
from anomalyncd.detect import DetectContext, LazyImages, create_detector, normalise_u8, save_detector, stream
from anomalyncd.detect.holdout import split_holdout
from anomalyncd.detect.metrics import detection_metrics, image_auroc, resize_masks
from anomalyncd.detect.plot import detection_grid, pick_examples
from anomalyncd.image_score import ImageScore, top_means
from anomalyncd.io import InputError, atomic_path, read_mask, write_json
from anomalyncd.stage import reads, run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

GRID_IMAGES = 8
#: Pixel AUROC and AUPRO of a larger set are taken over this many evenly spaced images.
METRIC_IMAGES = 1000


def metrics_records(manifest: Manifest, todo: list[Record]) -> list[Record]:
    """Normal test images not already among ``todo`` (mapped for the metrics only)."""
    if not manifest.has_ground_truth:
        return []
    ids = {r.id for r in todo}
    return [r for r in manifest.records if r.split == "test" and r.is_normal and r.id not in ids]


def no_normal_images(method: str, layout: str) -> str:
    """The error for a detector that fits on normal images (``method``) when the dataset of
    ``layout`` has none: the commands that fix it."""
    give = {
        "folder": "give a folder of known-good images: dvc exp run -S dataset.normal_root=<folder>",
        "mvtec": "add known-good images under <dataset.root>/<category>/train/good",
        "mtd": "check dataset.train_list (the MT_Free images of the training split)",
    }.get(layout, "add known-good images")
    return (
        f"{paths.MANIFEST}: detect.method {method} fits on known-good (normal) images and dataset.layout {layout} "
        f"gave none; {give}, or detect without them (zero-shot): dvc exp run -S detect.method=musc"
    )


def holdout_top_means(det, held: list[Record], tops: list[float]) -> np.ndarray:
    """float64 (H, S): the top means of the held-back normal images' score maps (mapped a chunk
    at a time, as the images to classify; their region maps are not needed), the image score's
    reference."""
    step = stream.chunk_size(det, len(held))
    out = [top_means(det.map_records_scored(held[a : a + step], lambda _: False)[1], tops) for a in range(0, len(held), step)]
    return np.concatenate(out) if out else np.zeros((0, len(tops)), np.float64)


def _masks(records: list[Record]) -> list[np.ndarray]:
    return [read_mask(r.mask) if r.mask else np.zeros((r.height, r.width), bool) for r in records]


def _finite(d: dict) -> dict:
    """NaN -> None, so the metrics file stays valid JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


@app.command(cls=reads("detect", "dataset.include_normal"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/detect/maps.zarr.zip, models/detector.pt, metrics/detect.json and plots/detect_grid.png."""
    p = load_params("detect", params)
    ds = load_params("dataset", params)
    manifest = Manifest.read(paths.MANIFEST)
    todo = manifest.to_classify(ds.include_normal)
    if not todo:
        raise InputError(f"{paths.MANIFEST}: no images to classify (no test images, or only normal ones)")
    # External maps exist only for the images to classify: no extra normal images then.
    extra = metrics_records(manifest, todo) if p.method != "external" else []
    # torchrun: every rank maps its block of the images into a part store; rank 0 gathers them
    # (under CUDA each rank's current device is its own GPU: "cuda" means it)
    rank, world, _ = shard.start(p.device)
    det = create_detector(p, DetectContext(dataset_root=ds.root))
    det.check_records(todo)
    typer.echo(f"detect: method {p.method}, backbone {p.backbone}, weights: {det.weights}", err=True)
    if p.backbone != "filterbank" and not det.pretrained and p.method in ("patchcore", "padim", "musc"):
        typer.echo(
            "detect: WARNING random backbone weights (detect.pretrained false, no detect.checkpoint); "
            "maps are much weaker than with pretrained weights",
            err=True,
        )

    shard.clear_parts(paths.MAPS, rank)
    start = time.perf_counter()
    train = manifest.train_normal()
    if det.needs_training_images and not train:
        raise InputError(no_normal_images(p.method, ds.layout))
    held: list[Record] = []
    fit_idx = np.arange(len(train))  # maps made elsewhere: a memory bank of all of them, for descriptors alone
    if det.needs_training_images:
        # normal images held back from the fit: predict's normal/defect threshold is taken on them
        fit_idx, held_idx = split_holdout(len(train), p.holdout, p.seed)
        held = [train[i] for i in held_idx]
    if len(fit_idx):
        if rank == 0:  # fitted once, so that every rank maps with the same state
            det.fit(LazyImages.of([train[i] for i in fit_idx]))
        if world > 1:
            det.load_state_dict(shard.broadcast(det.state_dict() if rank == 0 else None))
    evaluated = todo + extra
    mine = (
        (range(len(evaluated)) if rank == 0 else range(0))
        if det.maps_jointly
        else shard.block(len(evaluated), rank, world, p.batch_size)  # whole batches: as in one process
    )
    if world > 1:
        typer.echo(shard.describe("detect", rank, world, mine, "images"), err=True)
    stream.map_part(det, evaluated[mine.start : mine.stop], shard.part_path(paths.MAPS, rank, world), p.score_tops)
    shard.barrier()
    if rank != 0:
        shard.finish()
        return
    reference = holdout_top_means(det, held, p.score_tops)
    score = ImageScore.fit(p.score_tops, reference)
    attrs = {
        "method": p.method,
        "backbone": p.backbone,
        "weights": det.weights,
        "pretrained": bool(det.pretrained),
        "params": p,
        "image_score": score.to_attrs(),
        "holdout_scores": score.reference_scores(reference).astype(np.float32).tolist(),
    }
    try:
        with shard.Parts(shard.part_paths(paths.MAPS, world), stream.PART_KIND) as parts:
            lo, hi = stream.gather_maps(parts, paths.MAPS, todo, attrs, score)
            seconds = time.perf_counter() - start
            det.norm_min, det.norm_max = lo, hi
            save_detector(det, paths.DETECTOR)
            metrics = _metrics_and_grid(manifest, todo, extra, parts, p, det, lo, hi, score)
            metrics["holdout_images"] = len(held)
    finally:
        shard.remove_parts(paths.MAPS)
        shard.finish()
    write_json(paths.METRICS / "detect.json", _finite(metrics))
    write_json(paths.LOGS / "detect.json", {"seconds": round(seconds, 2)})  # not a metric: it varies per run
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro") if k in metrics)
    typer.echo(f"detect: {len(todo)} maps ({p.method}) -> {paths.MAPS}" + (f"; {shown}" if shown else ""))


def _metrics_and_grid(manifest, todo, extra, parts, p, det, lo: float, hi: float, score: ImageScore) -> dict:
    """Write plots/detect_grid.png; return the metrics (pixel metrics over at most
    ``METRIC_IMAGES`` of the evaluated images, image AUROC over all)."""
    metrics = {
        "method": p.method,
        "backbone": p.backbone,
        "weights": det.weights,
        "pretrained": bool(det.pretrained),
        "images": len(todo),
        "normal_images_for_metrics": len(extra),
    }
    evaluated = todo + extra
    all_scores = stream.map_scores(parts, score)
    if manifest.has_ground_truth and any(r.mask for r in evaluated):
        labels = np.array([not r.is_normal for r in evaluated])
        sample = stream.metric_sample(len(evaluated), METRIC_IMAGES)
        if len(sample) < len(evaluated):
            metrics["pixel_metrics_images"] = len(sample)
        masks = resize_masks(_masks([evaluated[i] for i in sample]), p.map_size)
        metrics.update(detection_metrics(parts.take("maps", sample), all_scores[sample], masks, labels[sample]))
        metrics["image_auroc"] = image_auroc(all_scores, labels)
        pick = pick_examples([r.defect_type for r in evaluated], GRID_IMAGES)
        grid = detection_grid(
            [evaluated[i].read() for i in pick],
            normalise_u8(parts.take("maps", pick), lo, hi),
            [_masks([evaluated[i]])[0] for i in pick],
            [f"{evaluated[i].id}  score {all_scores[i]:.3g}" for i in pick],
        )
    else:
        pick = list(range(min(GRID_IMAGES, len(todo))))
        grid = detection_grid(
            [todo[i].read() for i in pick],
            normalise_u8(parts.take("maps", pick), lo, hi),
            [None] * len(pick),
            [f"{todo[i].id}  score {all_scores[i]:.3g}" for i in pick],
        )
    with atomic_path(paths.PLOTS / "detect_grid.png") as tmp:
        tmp.write_bytes(cv2.imencode(".png", np.ascontiguousarray(grid[:, :, ::-1]))[1].tobytes())
    return metrics


if __name__ == "__main__":
    run(app)
