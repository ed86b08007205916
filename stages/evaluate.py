"""evaluate: clustering metrics, the confusion plot and the HTML report.

With ground truth: NMI, ARI and Hungarian-matched micro-F1 at image and crop level (a crop
carries its image's type), per-class precision/recall after matching, and per-category
scores with their mean when the run holds several categories. Without ground truth: cluster
sizes and mean confidences, and ``"ground_truth": false``. Reads merge's store
(data/merge/merged.zarr.zip) and the crop store. Writes metrics/evaluate.json (the DVC metric:
the headline figures experiments are compared on, :func:`anomalyncd.metrics.headline_metrics`),
metrics/evaluate_detail.json (everything, not a DVC metric; its ``clusters`` entry holds each
class's size and matched true type, which ``anomalyncd predict`` reads), plots/confusion.csv (a DVC confusion plot) and
reports/index.html with its images. Images where MEBin found no anomaly have no class: they
count as wrong in the F1 and ``no_anomaly`` counts them per true type.

The curated classes of the catalog (``classes.yaml``, resolved by ``merge`` and stored with its
result) are scored too (``curated`` in both metrics files: merged clusters count as one class,
images of rejected clusters as not classified), and name the report's sections, its confusion
matrix and the confusion plot.

The report also shows the detection, MEBin and number-of-classes metrics, the training curves
and the parameters of the run, and each image's anomaly map; files that are absent (a stage
run by hand) leave their section out.
"""

from pathlib import Path

import numpy as np
import typer
import yaml

from anomalyncd import paths
from anomalyncd.catalog import REJECTED_ID, CuratedClass, class_names, curated_labels, from_attrs
from anomalyncd.baseline import kmeans_clusters
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest
from anomalyncd.io import InputError, read_json, write_json
from anomalyncd.merge import Merger, merge_regions, write_table
from anomalyncd.metrics import evaluate_predictions, headline_metrics, score_clustering
from anomalyncd.report import ImageEntry, MebinEntry, ReportData, cluster_label, read_live_curves, write_report
from anomalyncd.stage import reads, run
from anomalyncd.store import CropSet, MergeSet, ProbSet, read_crops, read_maps, read_merged, read_probs

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

CONFUSION = paths.PLOTS / "confusion.csv"
TRAINING_CURVES = Path("dvclive/train/plots/metrics")
REPORT_PARAMS = ("dataset", "detect", "mebin", "train", "merge", "evaluate")  # dvc.yaml: evaluate's params


def mebin_examples(cs: CropSet, n: int, seed: int) -> list[MebinEntry]:
    """Count sequences of ``n`` images drawn with ``seed``, on the map's 0..255 threshold axis.

    Entry j of a count sequence is at ``255 - j * sample_rate`` on MEBin's rescaled axis,
    which maps back to the map's scale as ``t * (hi - lo) / 255 + lo``, the scale of the
    stored thresholds.
    """
    if n <= 0 or not len(cs.ids):
        return []
    params = cs.attrs.get("params") or {}
    rate = int(cs.attrs.get("sample_rate", params.get("sample_rate", 4)))
    lo, hi = int(cs.attrs.get("lo", 0)), int(cs.attrs.get("hi", 255))
    steps = 255 - np.arange(cs.count_seqs.shape[1]) * rate
    axis = steps * (hi - lo) / 255 + lo
    pick = np.sort(np.random.default_rng(seed).choice(len(cs.ids), size=min(n, len(cs.ids)), replace=False))
    return [MebinEntry(cs.ids[i], axis, cs.count_seqs[i], int(cs.thresholds[i])) for i in pick]


def read_optional_json(path: Path, stage: str) -> dict:
    """A metrics file of the earlier ``stage``, or {} when it is absent (a damaged one is an
    ``InputError``)."""
    return read_json(path, stage) if path.is_file() else {}


#: k-means seeds the baseline is averaged over: one k-means run on these features can land in a
#: partition several hundredths of NMI from another seed's.
BASELINE_SEEDS = 5


def baseline_metrics(cs: CropSet, ps: ProbSet, merger: Merger, seed: int, records: dict) -> dict:
    """Image and crop NMI / ARI / F1 of the frozen-feature baseline (:mod:`anomalyncd.baseline`):
    k-means on the crops' mask-pooled backbone features, merged to images like the model's
    predictions (images without anomaly count as wrong). The mean over ``BASELINE_SEEDS``
    k-means seeds from ``seed`` on, and under ``spread`` the standard deviation."""
    if len(ps.baseline_features) != len(cs.crops):
        raise InputError(f"{paths.PROBS}: {len(ps.baseline_features)} crops, {paths.CROPS} has {len(cs.crops)}; rerun infer (dvc repro)")
    k = int(ps.attrs.get("num_unlabeled", ps.probs.shape[-1]))
    truth = [records[i].defect_type for i in cs.ids]
    known = np.array([t is not None and t != "" for t in truth])
    known_truth = [t for t, k_ in zip(truth, known) if k_]
    crop_truth = [truth[i] for i in cs.image_index]
    runs: dict[str, list[dict]] = {"image": [], "crop": []}
    for s in range(seed, seed + BASELINE_SEEDS):
        crop_labels = kmeans_clusters(ps.baseline_features, k, s)
        merged = merge_regions(np.eye(k)[crop_labels], cs.areas, cs.image_index, len(cs.ids), merger.strategy, merger.temperature)
        runs["image"].append(score_clustering(known_truth, merged.labels[known]).summary())
        runs["crop"].append(score_clustering(crop_truth, crop_labels).summary())
    out: dict = {"features": "frozen backbone, mask-pooled; PCA + k-means", "kmeans_seeds": BASELINE_SEEDS}
    for level, rs in runs.items():
        out[level] = {"n": rs[0]["n"], **{m: float(np.mean([r[m] for r in rs])) for m in ("nmi", "ari", "f1")}}
        out.setdefault("spread", {})[level] = {m: float(np.std([r[m] for r in rs])) for m in ("nmi", "ari", "f1")}
    return out


def curated_metrics(ev_curated, curated: list[CuratedClass], labels: np.ndarray, confidence: np.ndarray) -> dict:
    """The ``curated`` entry of the metrics: the curated classes' image (and crop) scores where
    ground truth exists, their number, the images of rejected clusters, and per class its
    clusters, size, mean confidence and matched true type. ``ev_curated``: the evaluation of
    the curated labels (n,); ``confidence``: (n,)."""
    m = ev_curated.metrics
    out: dict = {k: m[k] for k in ("image", "crop") if k in m}
    names = class_names(curated)
    matching = ev_curated.image_scores.matching if ev_curated.image_scores else {}
    out["n_classes"] = sum(1 for k in names if k >= 0)
    out["rejected_images"] = int((labels == REJECTED_ID).sum())
    classes = {}
    for k, name in names.items():
        sel = labels == k
        conf = confidence[sel]
        conf = conf[np.isfinite(conf)]
        classes[name] = {
            "clusters": [c.cluster for c in curated if c.label == k],
            "size": int(sel.sum()),
            "mean_confidence": float(conf.mean()) if len(conf) else None,
            "matched": matching.get(k),
        }
    out["classes"] = classes
    return out


def check_merged(ms: MergeSet, cs: CropSet, records: dict) -> None:
    """``InputError`` unless the merge store holds the crop store's images and crops, all of
    them in the manifest."""
    unknown = [i for i in ms.ids if i not in records]
    if unknown:
        raise InputError(f"{paths.MERGED}: image ids not in {paths.MANIFEST}: {unknown[:5]}; rerun merge (dvc repro)")
    if ms.ids != cs.ids or len(ms.crop_clusters) != len(cs.crops):
        raise InputError(f"{paths.MERGED}: images or crops differ from {paths.CROPS}; rerun merge (dvc repro)")


@app.command(cls=reads("dataset", "detect", "mebin", "train", "evaluate", "merge"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write metrics/evaluate.json, metrics/evaluate_detail.json, plots/confusion.csv and reports/."""
    p = load_params("evaluate", params)
    # every input is read and checked before the first output is written
    records = Manifest.read(paths.MANIFEST).by_id()
    cs = read_crops(paths.CROPS)
    ms = read_merged(paths.MERGED)
    check_merged(ms, cs, records)
    earlier = {
        "detect": read_optional_json(paths.METRICS / "detect.json", "detect"),
        "mebin_metrics": read_optional_json(paths.METRICS / "mebin.json", "mebin"),
        "num_classes": read_optional_json(paths.NUM_CLASSES_METRICS, "train"),
        "curves": read_live_curves(TRAINING_CURVES),
        "params": {k: v for k, v in (yaml.safe_load(params.read_text()) or {}).items() if k in REPORT_PARAMS},
    }
    maps = read_maps(paths.MAPS) if paths.MAPS.exists() else None
    k = ms.n_classes
    ids = ms.ids
    anomaly = ms.anomaly.tolist()
    truth = {i: records[i].defect_type for i in ids}
    cats = {i: records[i].category for i in ids}
    crop_image = [ids[i] for i in cs.image_index.tolist()]
    ev = evaluate_predictions(
        image_truth=[truth[i] for i in ids],
        image_pred=ms.clusters.tolist(),
        image_confidence=ms.confidence.tolist(),
        image_category=[cats[i] for i in ids],
        crop_truth=[truth[i] for i in crop_image],
        crop_pred=ms.crop_clusters.tolist(),
        crop_category=[cats[i] for i in crop_image],
        n_clusters=k,
        image_anomaly=anomaly,
    )
    curated = from_attrs(ms.attrs.get("catalog"), str(paths.MERGED)) if "catalog" in ms.attrs else None
    if curated is None or len(curated) != k:
        raise InputError(f"{paths.MERGED}: has no class catalog for its {k} clusters; rerun merge (dvc repro)")
    image_labels = curated_labels(curated, ms.clusters)
    crop_labels = curated_labels(curated, ms.crop_clusters)
    ev_cur = evaluate_predictions(
        image_truth=[truth[i] for i in ids],
        image_pred=image_labels.tolist(),
        image_confidence=ms.confidence.tolist(),
        image_category=[cats[i] for i in ids],
        crop_truth=[truth[i] for i in crop_image],
        crop_pred=crop_labels.tolist(),
        crop_category=[cats[i] for i in crop_image],
        n_clusters=k,
        image_anomaly=anomaly,
    )
    ev.metrics["curated"] = curated_metrics(ev_cur, curated, image_labels, ms.confidence)
    # the report and the confusion plot show the curated classes by the catalog's names
    names = {c: n for c, n in class_names(curated).items() if c >= 0 and n != f"cluster {c}"}
    matched = ev_cur.image_scores.matching if ev_cur.image_scores else {}
    if ev.metrics["ground_truth"]:
        merger = Merger.from_attrs(ms.attrs, str(paths.MERGED))  # merged as the run's predictions were
        ev.metrics["baseline"] = baseline_metrics(cs, read_probs(paths.PROBS), merger, p.seed, records)
    crop_rows_of: dict[int, list[int]] = {}
    for j, i in enumerate(cs.image_index.tolist()):
        crop_rows_of.setdefault(i, []).append(j)
    map_of = dict(zip(maps.ids, maps.maps_u8)) if maps is not None else {}
    images = [
        ImageEntry(
            id=id_,
            path=records[id_].image,
            bits=records[id_].bits,
            cluster=int(image_labels[i]),
            confidence=float(ms.confidence[i]),
            truth=truth[id_],
            boxes=cs.boxes[crop_rows_of.get(i, [])].astype(np.int64).reshape(-1, 4),
            regions=cs.regions[crop_rows_of.get(i, [])].astype(np.int64).reshape(-1, 4),
            crop_rows=crop_rows_of.get(i, []),
            crop_clusters=[int(crop_labels[j]) for j in crop_rows_of.get(i, [])],
            crop_weights=[float(ms.weights[j]) for j in crop_rows_of.get(i, [])],
            anomaly=found,
            mebin_mask=cs.masks[i],
            map_u8=map_of.get(id_),
            true_mask=records[id_].mask,
        )
        for i, (id_, found) in enumerate(zip(ids, anomaly))
    ]
    s = ev_cur.image_scores
    roots = sorted({c.root for c in curated if not c.rejected})
    write_report(
        paths.REPORT,
        ReportData(
            title=f"anomalyncd: {len(ids)} images, {k} discovered classes"
            + (f", {len(roots)} after curation" if len(roots) != k or any(c.rejected for c in curated) else ""),
            n_clusters=k,
            images=images,
            metrics=ev.metrics,
            names=names,
            matched=matched,
            classes=roots,
            catalog=ms.attrs["catalog"],
            confusion=(s.classes, s.confusion_clusters, s.confusion) if s else None,
            mebin=mebin_examples(cs, p.mebin_plots, p.seed),
            per_class_images=p.report_images,
            **earlier,
        ),
    )
    # the report reads every image and mask: written first, so that a bad one leaves no metrics
    write_json(paths.EVALUATE_DETAIL, ev.metrics)
    write_json(paths.EVALUATE_METRICS, headline_metrics(ev.metrics))

    # The confusion plot: one row per image, DVC's confusion template counts them.
    write_table(
        CONFUSION,
        [
            {"actual": truth[i] or "unknown", "predicted": names.get(c) or cluster_label(c, {})}
            for i, c in zip(ids, image_labels.tolist())
        ],
        columns=["actual", "predicted"],
    )

    m = ev.metrics
    if m["ground_truth"]:
        summary = " ".join(f"{lvl} NMI {m[lvl]['nmi']:.3f} ARI {m[lvl]['ari']:.3f} F1 {m[lvl]['f1']:.3f};" for lvl in ("image", "crop") if lvl in m)
        b = m["baseline"]["image"]
        summary += f" (k-means on the frozen features, mean of {BASELINE_SEEDS} seeds: image NMI {b['nmi']:.3f} ARI {b['ari']:.3f} F1 {b['f1']:.3f})"
    else:
        summary = "no ground truth; cluster sizes " + str({c: v["size"] for c, v in m["clusters"].items()})
    cur = m["curated"]
    if "image" in cur:
        summary += f" curated ({cur['n_classes']} classes, {cur['rejected_images']} images rejected): image NMI {cur['image']['nmi']:.3f} ARI {cur['image']['ari']:.3f} F1 {cur['image']['f1']:.3f};"
    typer.echo(f"evaluate: {summary} no anomaly found in {m['no_anomaly']['images']} images; report: {paths.REPORT / 'index.html'}")


if __name__ == "__main__":
    run(app)
