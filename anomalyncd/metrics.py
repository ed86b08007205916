"""Clustering metrics for novel class discovery: NMI, ARI and Hungarian-matched F1.

Discovered clusters carry arbitrary ids, so a predicted cluster is first matched to a true
class: the one-to-one assignment that maximises the number of agreeing samples on the
contingency table (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``). After the
matching every sample has one predicted class name (or none, when its cluster was left
unmatched because there are more clusters than classes), and

* micro-F1 over all classes equals the fraction of samples whose matched cluster is their true
  class (each sample has exactly one true and at most one predicted label);
* per-class precision is ``n(class, matched cluster) / n(matched cluster)`` and recall
  ``n(class, matched cluster) / n(class)``; a class left without a cluster has both 0.

NMI and ARI need no matching and come from scikit-learn. Label ``-1`` in the predictions marks
a sample without a prediction (an image where MEBin found no anomaly, and its crop): it forms
its own group for NMI/ARI, is never matched, and counts as an error for F1; so does any other
negative label (``-2``: a cluster the catalog rejects as not a defect, :mod:`anomalyncd.catalog`). How many images had
no anomaly found, per true type, is reported beside the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

NO_PREDICTION = -1


@dataclass
class Contingency:
    """Counts of samples per (true class, predicted cluster).

    table: int64 (C, Q); classes: the C true class names (sorted); clusters: the Q predicted
    cluster ids (sorted, ``-1`` included when present).
    """

    table: np.ndarray
    classes: list[str]
    clusters: list[int]


def contingency(y_true: Sequence[str], y_pred: Sequence[int]) -> Contingency:
    """Contingency table of true class names (n,) against predicted cluster ids (n,)."""
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    classes = sorted(set(y_true.tolist()))
    clusters = sorted(set(y_pred.tolist()))
    ci = {c: i for i, c in enumerate(classes)}
    qi = {q: j for j, q in enumerate(clusters)}
    table = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(table, ([ci[c] for c in y_true.tolist()], [qi[q] for q in y_pred.tolist()]), 1)
    return Contingency(table=table, classes=classes, clusters=clusters)


def hungarian_match(table: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs of ``table`` (C, Q) maximising the sum of their counts.

    ``min(C, Q)`` pairs are returned, sorted by row. Ties are broken by scipy's deterministic
    solver.
    """
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D, got shape {table.shape}")
    if table.size == 0:
        return []
    rows, cols = linear_sum_assignment(table, maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist()))


@dataclass
class ClusteringScores:
    """Metrics of one set of predictions against ground truth.

    matching: predicted cluster id -> matched true class. per_class: class -> dict with
    ``cluster`` (matched id or None), ``precision``, ``recall``, ``f1``, ``support``.
    confusion: the contingency table with columns reordered so that each class's matched
    cluster sits on the diagonal, unmatched clusters last (``confusion_clusters`` holds their
    ids).
    """

    n: int
    nmi: float
    ari: float
    f1: float
    matching: dict[int, str]
    per_class: dict[str, dict]
    classes: list[str]
    confusion: np.ndarray
    confusion_clusters: list[int]

    def summary(self) -> dict:
        """The headline numbers as a JSON-ready dict."""
        return {"n": self.n, "nmi": self.nmi, "ari": self.ari, "f1": self.f1}

    def matched_labels(self, y_pred: Sequence[int]) -> list[str | None]:
        """Matched class name of each prediction (None for unmatched clusters and -1)."""
        return [self.matching.get(int(q)) for q in y_pred]


def score_clustering(y_true: Sequence[str], y_pred: Sequence[int]) -> ClusteringScores:
    """NMI, ARI, Hungarian micro-F1 and per-class precision/recall of ``y_pred`` (n,) cluster
    ids against ``y_true`` (n,) class names."""
    y_true = [str(t) for t in y_true]
    y_pred = [int(q) for q in y_pred]
    if not y_true:
        raise ValueError("no samples to evaluate")
    ct = contingency(y_true, y_pred)
    matchable = [j for j, q in enumerate(ct.clusters) if q >= 0]
    pairs = [(r, matchable[c]) for r, c in hungarian_match(ct.table[:, matchable])]
    matching = {ct.clusters[c]: ct.classes[r] for r, c in pairs}
    col_of_row = dict(pairs)
    correct = sum(int(ct.table[r, c]) for r, c in pairs)
    row_tot, col_tot = ct.table.sum(1), ct.table.sum(0)

    per_class = {}
    for r, name in enumerate(ct.classes):
        c = col_of_row.get(r)
        tp = int(ct.table[r, c]) if c is not None else 0
        p = tp / col_tot[c] if c is not None and col_tot[c] else 0.0
        rc = tp / row_tot[r] if row_tot[r] else 0.0
        per_class[name] = {
            "cluster": ct.clusters[c] if c is not None else None,
            "precision": float(p),
            "recall": float(rc),
            "f1": float(2 * p * rc / (p + rc)) if p + rc else 0.0,
            "support": int(row_tot[r]),
        }

    order = [col_of_row[r] for r in range(len(ct.classes)) if r in col_of_row]
    order += [j for j in range(len(ct.clusters)) if j not in order]
    n = len(y_true)
    return ClusteringScores(
        n=n,
        nmi=float(normalized_mutual_info_score(y_true, y_pred)),
        ari=float(adjusted_rand_score(y_true, y_pred)),
        f1=correct / n,
        matching=matching,
        per_class=per_class,
        classes=ct.classes,
        confusion=ct.table[:, order],
        confusion_clusters=[ct.clusters[j] for j in order],
    )


def cluster_summary(labels: np.ndarray, confidence: np.ndarray, n_clusters: int) -> dict[int, dict]:
    """Size and mean confidence of each cluster ``0..n_clusters-1`` (and ``-1`` if present).

    labels: int (n,); confidence: float (n,) probability of the predicted cluster. Clusters
    without members have size 0 and mean confidence None.
    """
    labels = np.asarray(labels, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float64)
    ids = list(range(n_clusters)) + ([NO_PREDICTION] if (labels == NO_PREDICTION).any() else [])
    out = {}
    for k in ids:
        sel = labels == k
        conf = confidence[sel]
        conf = conf[np.isfinite(conf)]
        out[k] = {"size": int(sel.sum()), "mean_confidence": float(conf.mean()) if len(conf) else None}
    return out


def no_anomaly_counts(anomaly: np.ndarray, truth: Sequence[str]) -> dict:
    """``images``: how many of the images (anomaly: bool (n,)) had no anomaly found, their
    ``fraction``, and ``per_type``: that count for each true type (``""``: unknown) that has any."""
    missing = ~np.asarray(anomaly, bool)
    per_type: dict[str, int] = {}
    for t in np.asarray(truth, dtype=object)[missing].tolist():
        per_type[t] = per_type.get(t, 0) + 1
    n = len(missing)
    return {"images": int(missing.sum()), "fraction": float(missing.mean()) if n else 0.0, "per_type": dict(sorted(per_type.items()))}


def mean_scores(per_group: dict[str, dict[str, float]], keys: Sequence[str] = ("nmi", "ari", "f1")) -> dict:
    """Unweighted mean of each metric over groups (the paper's per-category mean row)."""
    if not per_group:
        return {}
    return {k: float(np.mean([g[k] for g in per_group.values()])) for k in keys}


def truth_labels(truth: Sequence[str], categories: Sequence[str], known: np.ndarray, several: bool) -> list[str]:
    """The true classes of the ``known`` (bool (n,)) samples: their types, ``<category>/<type>``
    when the run holds ``several`` categories."""
    t = np.asarray(truth, dtype=object)[known]
    c = np.asarray(categories, dtype=object)[known]
    return [f"{ci}/{ti}" for ci, ti in zip(c, t)] if several else t.tolist()


def matched_types(image_truth: Sequence[str], image_pred: Sequence[int], image_category: Sequence[str]) -> dict[int, str]:
    """Cluster id -> matched true class at image level, as :func:`evaluate_predictions` matches
    them ({} without ground truth: every true type ``""``)."""
    known = np.array([bool(t) for t in image_truth], dtype=bool)
    if not known.any():
        return {}
    several = len(set(np.asarray(image_category, dtype=object)[known].tolist())) > 1
    pred = np.asarray(image_pred, dtype=np.int64)[known]
    return score_clustering(truth_labels(image_truth, image_category, known, several), pred).matching


@dataclass
class Evaluation:
    """Result of :func:`evaluate_predictions`: the JSON-ready ``metrics`` dict and, with ground
    truth, the image-level scores (matching and confusion matrix) of the whole run."""

    metrics: dict
    image_scores: ClusteringScores | None


def evaluate_predictions(
    image_truth: Sequence[str],
    image_pred: Sequence[int],
    image_confidence: Sequence[float],
    image_category: Sequence[str],
    crop_truth: Sequence[str],
    crop_pred: Sequence[int],
    crop_category: Sequence[str],
    n_clusters: int,
    image_anomaly: Sequence[bool] | None = None,
) -> Evaluation:
    """Metrics of a run at image level (n,) and crop level (m,) (a crop carries its image's
    true type).

    ``image_anomaly`` (n,): whether MEBin found an anomaly in the image (default: all).
    ``no_anomaly`` counts the images without, in total and per true type; they have no
    confidence, so the clusters' mean confidences leave them out.

    A true type of ``""`` means unknown: such samples are left out of the ground-truth
    metrics. With no known type at all the metrics hold ``"ground_truth": false`` and the
    cluster sizes and mean confidences only. With several categories the run-wide true
    classes are ``<category>/<type>`` (a "crack" on a tile is not a "crack" on a screw),
    ``per_category`` holds each category's metrics (matched within the category) and ``mean``
    their unweighted mean, as in the paper's per-category tables.
    """
    image_pred = np.asarray(image_pred, dtype=np.int64)
    crop_pred = np.asarray(crop_pred, dtype=np.int64)
    clusters = cluster_summary(image_pred, np.asarray(image_confidence, dtype=np.float64), n_clusters)
    found = np.ones(len(image_pred), bool) if image_anomaly is None else np.asarray(image_anomaly, bool)
    metrics: dict = {
        "ground_truth": False,
        "n_images": len(image_pred),
        "n_crops": len(crop_pred),
        "n_clusters": n_clusters,
        "no_anomaly": no_anomaly_counts(found, image_truth),
    }
    img_known = np.array([bool(t) for t in image_truth], dtype=bool)
    crop_known = np.array([bool(t) for t in crop_truth], dtype=bool)
    if not img_known.any():
        metrics["clusters"] = {str(k): v for k, v in clusters.items()}
        return Evaluation(metrics, None)

    categories = sorted(set(np.asarray(image_category, dtype=object)[img_known].tolist()))
    several = len(categories) > 1

    def labels(truth, cats, known):
        return truth_labels(truth, cats, known, several)

    img_scores = score_clustering(labels(image_truth, image_category, img_known), image_pred[img_known])
    crop_scores = (
        score_clustering(labels(crop_truth, crop_category, crop_known), crop_pred[crop_known])
        if crop_known.any()
        else None
    )
    metrics["ground_truth"] = True
    metrics["n_unlabelled_images"] = int((~img_known).sum())
    metrics["image"] = img_scores.summary()
    if crop_scores is not None:
        metrics["crop"] = crop_scores.summary()
    metrics["per_class"] = img_scores.per_class
    for k, v in clusters.items():
        v["matched"] = img_scores.matching.get(k)
    metrics["clusters"] = {str(k): v for k, v in clusters.items()}

    if several:
        per_cat: dict[str, dict] = {}
        img_cat = np.asarray(image_category, dtype=object)
        crop_cat = np.asarray(crop_category, dtype=object)
        img_t = np.asarray(image_truth, dtype=object)
        crop_t = np.asarray(crop_truth, dtype=object)
        for cat in categories:
            si = img_known & (img_cat == cat)
            sc = crop_known & (crop_cat == cat)
            s = score_clustering(img_t[si].tolist(), image_pred[si])
            entry = {"image": s.summary(), "per_class": s.per_class}
            if sc.any():
                entry["crop"] = score_clustering(crop_t[sc].tolist(), crop_pred[sc]).summary()
            per_cat[cat] = entry
        metrics["per_category"] = per_cat
        metrics["mean"] = {
            lvl: mean_scores({c: v[lvl] for c, v in per_cat.items() if lvl in v})
            for lvl in ("image", "crop")
            if any(lvl in v for v in per_cat.values())
        }
    return Evaluation(metrics, img_scores)


#: The keys of a run's metrics that ``metrics/evaluate.json`` (a DVC metric: a column of
#: ``dvc exp show``) keeps; the rest (per class, per cluster, per category) is the detail file.
HEADLINE_SCORES = ("nmi", "ari", "f1")


def headline_metrics(metrics: dict) -> dict:
    """The few figures of a run's metrics (:func:`evaluate_predictions`, with ``baseline``)
    that experiments are compared on: whether ground truth existed, the numbers of images and
    classes, the images without anomaly, and NMI / ARI / F1 at image and crop level, of the
    baseline at image level, their per-category mean where there are several categories, and the
    catalog's curated classes (``curated``: their number, the images rejected, image NMI / ARI / F1)."""
    out: dict = {k: metrics[k] for k in ("ground_truth", "n_images", "n_clusters") if k in metrics}
    out["no_anomaly"] = {"images": metrics["no_anomaly"]["images"]} if "no_anomaly" in metrics else {}
    pick = lambda d: {k: d[k] for k in HEADLINE_SCORES if k in d}  # noqa: E731
    for level in ("image", "crop"):
        if level in metrics:
            out[level] = pick(metrics[level])
    if "image" in metrics.get("baseline", {}):
        out["baseline"] = {"image": pick(metrics["baseline"]["image"])}
    if metrics.get("mean", {}).get("image"):
        out["mean"] = {"image": pick(metrics["mean"]["image"])}
    if "curated" in metrics:
        cur = metrics["curated"]
        out["curated"] = {"n_classes": cur["n_classes"], "rejected_images": cur["rejected_images"]}
        if "image" in cur:
            out["curated"]["image"] = pick(cur["image"])
    return out
