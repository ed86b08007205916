"""calibrate: the thresholds of predict's normal/defect and known/unknown-type decisions.

Reads the image scores of the normal images ``detect`` held back from its fit (the maps store's
``holdout_scores``), the crops' features (``infer``), merge's crop classes and weights, and the
selected head's class weights (``models/mgvit.pt``); writes ``models/calibration.json``: those
scores and the run's own images' unknown scores with the thresholds at
``calibrate.normal_quantile`` and ``calibrate.unknown_quantile``, and the class prototypes
(:mod:`anomalyncd.calibrate`). No stage reads it: ``anomalyncd predict`` does.
"""

from pathlib import Path

import numpy as np
import typer

from anomalyncd import paths
from anomalyncd.calibrate import calibrate, class_prototypes, no_normal_calibration
from anomalyncd.config import load_params
from anomalyncd.image_score import ImageScore
from anomalyncd.io import InputError, write_json
from anomalyncd.stage import reads, run
from anomalyncd.store import StoreReader, read_crops, read_merged, read_probs

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=reads("calibrate"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write models/calibration.json."""
    p = load_params("calibrate", params)
    with StoreReader(paths.MAPS, "maps") as r:
        attrs = r.attrs
    if "holdout_scores" not in attrs:
        raise InputError(f"{paths.MAPS}: has no holdout_scores (written before detect.holdout existed); rerun detect (dvc repro)")
    det = attrs.get("params") or {}
    cs, ps, ms = read_crops(paths.CROPS, lazy=True), read_probs(paths.PROBS, lazy=True), read_merged(paths.MERGED)
    if not (len(ps.features) == len(cs.image_index) == len(ms.crop_clusters)):
        raise InputError(
            f"{paths.PROBS}, {paths.MERGED}: {len(ps.features)} and {len(ms.crop_clusters)} crops but {paths.CROPS} holds "
            f"{len(cs.image_index)}; rerun infer and merge (dvc repro)"
        )
    held = np.asarray(attrs["holdout_scores"], np.float64)
    cal = calibrate(
        holdout_scores=held,
        image_score=ImageScore.from_attrs(attrs, str(paths.MAPS)).to_attrs(),
        features=np.asarray(ps.features[:], np.float32),
        prototypes=head_prototypes(ms.crop_clusters, ms.n_classes),
        weights=ms.weights,
        image_index=np.asarray(cs.image_index),
        anomaly=ms.anomaly,
        normal_quantile=p.normal_quantile,
        unknown_quantile=p.unknown_quantile,
        method=str(attrs.get("method", "")),
        note="" if len(held) else no_normal_calibration(str(attrs.get("method", "")), float(det.get("holdout", 0.0))),
    )
    write_json(paths.CALIBRATION, cal.to_dict())
    normal = "off" if cal.normal_threshold is None else f"{cal.normal_threshold:.4g} ({len(held)} held-back normal images)"
    unknown = "off" if cal.unknown_threshold is None else f"{cal.unknown_threshold:.4g} ({len(cal.known_scores)} images)"
    typer.echo(f"calibrate: normal/defect threshold {normal}; unknown-type threshold {unknown} -> {paths.CALIBRATION}")


def head_prototypes(crop_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The class prototypes of the run's classifier: its selected head's class weights
    (:func:`anomalyncd.calibrate.class_prototypes`)."""
    from anomalyncd.model import read_head

    weight, num_labeled = read_head(paths.MODEL)  # the tensors alone: no network to build
    protos = class_prototypes(weight, num_labeled, crop_labels)
    if len(protos) != n_classes:
        raise InputError(f"{paths.MODEL} has {len(protos)} classes and {paths.MERGED} {n_classes}; rerun infer and merge (dvc repro)")
    return protos


if __name__ == "__main__":
    run(app)
