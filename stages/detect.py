"""detect: one anomaly map per image to classify, from the detector named by detect.method.

Writes the maps store (raw maps, 0..255 maps over the global min-max of the set, image scores
= mean of each map's ``detect.score_top`` highest pixels), the fitted detector (``models/detector.pt``, for ``anomalyncd predict``) and,
where the dataset has ground truth, image AUROC, pixel AUROC and AUPRO with a PNG grid.

Metrics need normal images too: the normal test images that are not classified
(``dataset.include_normal: false``) are mapped as well, for the metrics only; they are not in
the store. For ``musc`` they join the set of images that score each other.
"""

import time
from pathlib import Path

import cv2
import numpy as np
import typer

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest, Record
from anomalyncd.detect import DetectContext, LazyImages, create_detector, normalise_u8, save_detector
from anomalyncd.detect.metrics import detection_metrics, resize_masks
from anomalyncd.detect.ops import image_scores
from anomalyncd.detect.plot import detection_grid, pick_examples
from anomalyncd.io import InputError, atomic_path, read_image, read_mask, write_json
from anomalyncd.stage import run
from anomalyncd.store import MapSet, write_maps

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

GRID_IMAGES = 8


def metrics_records(manifest: Manifest, todo: list[Record]) -> list[Record]:
    """Normal test images not already among ``todo`` (mapped for the metrics only)."""
    if not manifest.has_ground_truth:
        return []
    ids = {r.id for r in todo}
    return [r for r in manifest.records if r.split == "test" and r.is_normal and r.id not in ids]


def _masks(records: list[Record]) -> list[np.ndarray]:
    return [read_mask(r.mask) if r.mask else np.zeros((r.height, r.width), bool) for r in records]


def check_finite(maps: np.ndarray, records: list[Record], method: str) -> None:
    """Raise ``InputError`` before anything is written if a map (N, S, S) holds NaN or inf."""
    bad = [r.id for r, ok in zip(records, np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)) if not ok]
    if bad:
        raise InputError(
            f"params.yaml: detect.method {method} made NaN or infinite maps for {len(bad)} image(s), e.g. {bad[:3]}; "
            "try another detect.method or backbone"
        )


def _finite(d: dict) -> dict:
    """NaN -> None, so the metrics file stays valid JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


@app.command()
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
    det = create_detector(p, DetectContext(dataset_root=ds.root))
    typer.echo(f"detect: method {p.method}, backbone {p.backbone}, weights: {det.weights}", err=True)
    if p.backbone != "filterbank" and not det.pretrained and p.method in ("patchcore", "padim", "musc"):
        typer.echo(
            "detect: WARNING random backbone weights (detect.pretrained false, no detect.checkpoint); "
            "maps are much weaker than with pretrained weights",
            err=True,
        )

    start = time.perf_counter()
    if det.needs_training_images:
        det.fit(LazyImages([r.image for r in manifest.train_normal()]))
    all_maps = det.map_records(todo + extra)
    seconds = time.perf_counter() - start
    check_finite(all_maps, todo + extra, p.method)

    maps = all_maps[: len(todo)]
    lo, hi = float(maps.min()), float(maps.max())
    det.norm_min, det.norm_max = lo, hi
    maps_u8 = normalise_u8(maps, lo, hi)
    all_scores = image_scores(all_maps, p.score_top)
    scores = all_scores[: len(todo)]
    attrs = {
        "method": p.method,
        "backbone": p.backbone,
        "weights": det.weights,
        "pretrained": bool(det.pretrained),
        "norm_min": lo,
        "norm_max": hi,
        "params": p,
    }
    write_maps(
        paths.MAPS,
        MapSet(
            ids=[r.id for r in todo],
            maps=maps,
            maps_u8=maps_u8,
            scores=scores,
            image_sizes=np.array([[r.height, r.width] for r in todo]),
            attrs=attrs,
        ),
    )
    save_detector(det, paths.DETECTOR)

    metrics = {
        **{k: attrs[k] for k in ("method", "backbone", "weights", "pretrained")},
        "images": len(todo),
        "normal_images_for_metrics": len(extra),
    }
    evaluated = todo + extra
    if manifest.has_ground_truth and any(r.mask for r in evaluated):
        full_masks = _masks(evaluated)
        labels = np.array([not r.is_normal for r in evaluated])
        metrics.update(detection_metrics(all_maps, all_scores, resize_masks(full_masks, p.map_size), labels))
        pick = pick_examples([r.defect_type for r in evaluated], GRID_IMAGES)
        grid = detection_grid(
            [read_image(evaluated[i].image) for i in pick],
            normalise_u8(all_maps[pick], lo, hi),
            [full_masks[i] for i in pick],
            [f"{evaluated[i].id}  score {all_scores[i]:.3g}" for i in pick],
        )
    else:
        pick = list(range(min(GRID_IMAGES, len(todo))))
        grid = detection_grid(
            [read_image(todo[i].image) for i in pick],
            maps_u8[pick],
            [None] * len(pick),
            [f"{todo[i].id}  score {scores[i]:.3g}" for i in pick],
        )
    with atomic_path(paths.PLOTS / "detect_grid.png") as tmp:
        tmp.write_bytes(cv2.imencode(".png", np.ascontiguousarray(grid[:, :, ::-1]))[1].tobytes())
    write_json(paths.METRICS / "detect.json", _finite(metrics))
    write_json(paths.LOGS / "detect.json", {"seconds": round(seconds, 2)})  # not a metric: it varies per run
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro") if k in metrics)
    typer.echo(f"detect: {len(todo)} maps ({p.method}) -> {paths.MAPS}" + (f"; {shown}" if shown else ""))


if __name__ == "__main__":
    run(app)
