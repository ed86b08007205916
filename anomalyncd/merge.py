"""Region merging: from crop-level class probabilities to one class per image.

An image with several anomalous regions has one crop per region. AnomalyNCD
(https://arxiv.org/abs/2410.14379) gives the image
the class of a weighted sum of its crops' probabilities, the weights being a softmax over the
image's crops of ``sqrt(mask area in pixels) / T``: large regions dominate, and ``T`` sets how
strongly (large ``T``: plain average; small ``T``: the largest region decides). The paper uses
``T = 50`` on MTD and ``T = 100`` on MVTec AD. ``strategy="mean"`` is the plain average of the
paper's ablation.

An image where MEBin found no anomaly has one whole-image crop with an empty mask. Its class
would be a guess about the whole surface (often a confident one), so it gets none: it is marked
``no anomaly found`` with cluster -1 (the normal class instead, when the run has one) and no
confidence, and so stays out of the sizes and confidences of the defect classes.
With ``dataset.include_normal``, an image classed as the normal class has status ``normal``.

Pure functions on arrays, and :class:`Merger`, the settings they run with, which the ``merge``
stage stores with its result so that ``anomalyncd predict`` merges as the run did; the stage
does the I/O.
"""

from __future__ import annotations

import csv
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .io import InputError, atomic_path
from .store import MergeSet

STRATEGIES = ("weighted", "mean")
NO_ANOMALY = -1  # the cluster of an image where MEBin found no anomaly (without a normal class)
STATUS = {True: "anomaly found", False: "no anomaly found"}
#: the status of an image judged defect-free: classed as the run's normal class
#: (``dataset.include_normal``), or, in ``anomalyncd predict``, scored under the normal threshold
NORMAL = "normal"


def row_label(row: dict) -> str:
    """What a row of the predictions table was classed as, in a word: its class name, else its
    status."""
    if row["status"] != STATUS[True]:
        return row["status"]
    return row.get("name") or f"cluster {row['cluster']}"


def image_status(anomaly: bool, label: int, no_anomaly: int = NO_ANOMALY) -> str:
    """An image's status: :data:`NORMAL` when MEBin found a region but the image is classed as
    the normal class (``no_anomaly >= 0``: the run has one), else :data:`STATUS` of ``anomaly``."""
    if anomaly and no_anomaly >= 0 and label == no_anomaly:
        return NORMAL
    return STATUS[bool(anomaly)]


def no_anomaly_cluster(prob_attrs: dict) -> int:
    """The cluster of an image without anomaly: the normal class among the novel classes when
    the model has one (``normal_slot`` in the probability store's attrs), else :data:`NO_ANOMALY`."""
    slot = prob_attrs.get("normal_slot")
    return NO_ANOMALY if slot is None else int(slot) - int(prob_attrs.get("num_labeled", 0))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (float64 in, float64 out)."""
    x = np.asarray(x, dtype=np.float64)
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def novel_probabilities(probs: np.ndarray, head: int, num_labeled: int = 0) -> np.ndarray:
    """The selected head's class probabilities over the novel classes: (M, n_head, K) ->
    (M, K - num_labeled).

    ``infer`` stores ``probs = softmax(logits / 0.1)`` over the novel outputs with the
    ``num_labeled`` base outputs (first in K) zeroed, i.e. exactly the crop probabilities of
    region merging, so they are used as they are; dropping the base columns makes cluster
    ``k`` the k-th novel class. Rows must sum to 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (M, n_head, K), got shape {probs.shape}")
    if not 0 <= head < probs.shape[1]:
        raise ValueError(f"selected head {head} outside 0..{probs.shape[1] - 1}")
    out = probs[:, head, num_labeled:]
    if out.shape[1] == 0:
        raise ValueError(f"no novel classes: K = {probs.shape[2]}, num_labeled = {num_labeled}")
    if len(out) and not np.allclose(out.sum(1), 1.0, atol=1e-3):
        raise ValueError("novel-class probabilities do not sum to 1; rerun infer")
    return out


def region_weights(
    areas: np.ndarray,
    image_index: np.ndarray,
    n_images: int,
    strategy: str,
    temperature: float,
) -> np.ndarray:
    """Weight of every crop within its image; the weights of one image's crops sum to 1.

    areas: (M,) anomaly pixels of each crop's region. image_index: (M,) int, the image of
    each crop, in ``0..n_images-1``. Returns float64 (M,).

    ``weighted``: softmax over the image's crops of ``sqrt(area) / temperature``.
    ``mean``: ``1 / (number of crops of the image)``.
    """
    areas = np.asarray(areas, dtype=np.float64)
    image_index = np.asarray(image_index, dtype=np.int64)
    _check_crops(areas, image_index, n_images)
    if strategy not in STRATEGIES:
        raise ValueError(f"merge strategy {strategy!r} is not one of {list(STRATEGIES)}")
    if strategy == "mean":
        logit = np.zeros_like(areas)
    else:
        if not temperature > 0:
            raise ValueError(f"merge temperature must be > 0, got {temperature}")
        if np.any(areas < 0):
            raise ValueError("crop areas must be >= 0")
        logit = np.sqrt(areas) / temperature
    # Softmax within groups: subtract each image's max for stability, then normalise.
    group_max = np.full(n_images, -np.inf)
    np.maximum.at(group_max, image_index, logit)
    e = np.exp(logit - group_max[image_index])
    total = np.zeros(n_images)
    np.add.at(total, image_index, e)
    return e / total[image_index]


@dataclass
class MergedPredictions:
    """Image-level result of :func:`merge_regions`.

    probs: float64 (N, K) merged class probabilities (NaN rows for images without anomaly).
    labels: int64 (N,) argmax class, the no-anomaly cluster for images without anomaly.
    confidence: float64 (N,) probability of that class (NaN without anomaly). n_crops: int64
    (N,). weights: float64 (M,) each crop's weight within its image. anomaly: bool (N,) whether
    MEBin found an anomaly region in the image (one of its crops has mask pixels).
    """

    probs: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    n_crops: np.ndarray
    weights: np.ndarray
    anomaly: np.ndarray


def merge_regions(
    crop_probs: np.ndarray,
    areas: np.ndarray,
    image_index: np.ndarray,
    n_images: int,
    strategy: str,
    temperature: float,
    no_anomaly: int = NO_ANOMALY,
) -> MergedPredictions:
    """Merge crop probabilities (M, K) into image probabilities (N, K).

    An image's probabilities are the :func:`region_weights`-weighted sum of its crops'
    probabilities, so an image with one crop keeps that crop's prediction exactly. Images
    without an anomaly region (no crop with ``areas > 0``, or no crop at all) get NaN
    probabilities and the label ``no_anomaly`` (:func:`no_anomaly_cluster`).
    """
    crop_probs = np.asarray(crop_probs, dtype=np.float64)
    if crop_probs.ndim != 2:
        raise ValueError(f"crop_probs must be (M, K), got shape {crop_probs.shape}")
    image_index = np.asarray(image_index, dtype=np.int64)
    if len(crop_probs) != len(image_index):
        raise ValueError(f"crop_probs has {len(crop_probs)} rows but image_index has {len(image_index)}")
    w = region_weights(areas, image_index, n_images, strategy, temperature)
    probs = np.zeros((n_images, crop_probs.shape[1]))
    np.add.at(probs, image_index, w[:, None] * crop_probs)
    n_crops = np.bincount(image_index, minlength=n_images).astype(np.int64)
    anomaly = np.bincount(image_index, weights=np.asarray(areas) > 0, minlength=n_images) > 0
    probs[~anomaly] = np.nan
    labels = np.full(n_images, no_anomaly, dtype=np.int64)
    confidence = np.full(n_images, np.nan)
    if anomaly.any():
        labels[anomaly] = np.argmax(probs[anomaly], axis=1)
        confidence[anomaly] = probs[anomaly, labels[anomaly]]
    return MergedPredictions(probs, labels, confidence, n_crops, w, anomaly)


def _check_crops(areas: np.ndarray, image_index: np.ndarray, n_images: int) -> None:
    if areas.ndim != 1 or image_index.ndim != 1 or len(areas) != len(image_index):
        raise ValueError(f"areas {areas.shape} and image_index {image_index.shape} must be (M,) of equal length")
    if len(image_index) and (image_index.min() < 0 or image_index.max() >= n_images):
        raise ValueError(f"image_index must lie in 0..{n_images - 1}")


# -- tables ----------------------------------------------------------------------------------
# The merge stage and ``anomalyncd predict`` write the same two tables: one row per image and
# one row per crop. Each crop has two boxes ``x0 y0 x1 y1`` in image pixels (x1, y1 exclusive),
# both inside the image: the defect's own box (the extent of its region, empty for the
# whole-image crop of an image without anomaly) and the context crop the classifier saw (cut to
# the image). In an image row they are joined by ``;``, in the order of ``crop_clusters``.


def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6f}"


def clip_box(box: Sequence[int], size: Sequence[int]) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) cut to an image of ``size = (H, W)``: the part of a crop box
    that lies inside the image (a crop box may reach outside it: :func:`anomalyncd.mebin.region_boxes`)."""
    h, w = (int(v) for v in size)
    x0, y0, x1, y1 = (int(v) for v in box)
    return (min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h))


def table_boxes(
    boxes: np.ndarray, regions: np.ndarray, areas: np.ndarray, image_index: np.ndarray, image_sizes: np.ndarray
) -> tuple[list[tuple[int, ...] | None], list[tuple[int, ...]]]:
    """Each crop's two boxes as the tables give them: the defect's own box (``regions``; None
    for a crop without region, ``areas`` 0) and the context crop ``boxes`` cut to its image.

    boxes, regions: int (M, 4) as in :class:`anomalyncd.store.CropSet`; areas, image_index:
    (M,); image_sizes: int (N, 2) as (H, W).
    """
    defect = [tuple(int(v) for v in r) if a > 0 else None for r, a in zip(np.asarray(regions).reshape(-1, 4), areas)]
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    context = [clip_box(b, sizes[i]) for b, i in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(image_index).tolist())]
    return defect, context


def _box_text(box: Sequence[int] | None) -> str:
    return "" if box is None else " ".join(str(int(v)) for v in box)


def image_rows(
    ids: list[str],
    images: list[str],
    categories: list[str],
    merged: MergedPredictions,
    defect_boxes: list,
    crop_boxes: list,
    image_index: np.ndarray,
    crop_labels: np.ndarray,
    no_anomaly: int = NO_ANOMALY,
) -> Iterator[dict[str, str | int]]:
    """One row per image, generated (a table of any length is written without holding it):
    id, image path, category, cluster, status (:func:`image_status`), confidence (empty without
    anomaly), n_crops, boxes (the defects'), crop_boxes, crop_clusters and prob_<k> for every
    class k.

    defect_boxes, crop_boxes: (M,) from :func:`table_boxes`; image_index: int (M,);
    crop_labels: int (M,) each crop's own class.
    """
    per_image: list[list[int]] = [[] for _ in ids]
    for j, i in enumerate(np.asarray(image_index).tolist()):
        per_image[i].append(j)
    for i, id_ in enumerate(ids):
        js = per_image[i]
        row: dict[str, str | int] = {
            "id": id_,
            "image": images[i],
            "category": categories[i],
            "cluster": int(merged.labels[i]),
            "status": image_status(bool(merged.anomaly[i]), int(merged.labels[i]), no_anomaly),
            "confidence": _fmt(merged.confidence[i]),
            "n_crops": int(merged.n_crops[i]),
            "boxes": ";".join(_box_text(defect_boxes[j]) for j in js),
            "crop_boxes": ";".join(_box_text(crop_boxes[j]) for j in js),
            "crop_clusters": ";".join(str(int(crop_labels[j])) for j in js),
        }
        row.update({f"prob_{k}": _fmt(p) for k, p in enumerate(merged.probs[i])})
        yield row


def crop_rows(
    crop_ids: list[str],
    image_ids: list[str],
    defect_boxes: list,
    crop_boxes: list,
    areas: np.ndarray,
    scores: np.ndarray,
    crop_probs: np.ndarray,
    weights: np.ndarray,
    crop_labels: np.ndarray,
) -> Iterator[dict[str, str | int]]:
    """One row per crop, generated: crop_id, image_id, the defect's box (x0, y0, x1, y1; empty
    without region), the context crop (crop_x0, crop_y0, crop_x1, crop_y1), area, score, its
    class (``crop_labels`` (M,)) and confidence (empty for a crop without mask pixels, which
    holds no region), its weight in the image merge, and prob_<k>.

    image_ids: (M,) the image id of each crop; defect_boxes, crop_boxes: (M,) from
    :func:`table_boxes`; crop_probs: (M, K); weights: (M,).
    """
    for j, cid in enumerate(crop_ids):
        k = int(crop_labels[j])
        defect = defect_boxes[j] or ("",) * 4
        row: dict[str, str | int] = {
            "crop_id": cid,
            "image_id": image_ids[j],
            **dict(zip(("x0", "y0", "x1", "y1"), defect)),
            **dict(zip(("crop_x0", "crop_y0", "crop_x1", "crop_y1"), crop_boxes[j])),
            "area": int(areas[j]),
            "score": _fmt(float(scores[j])),
            "cluster": k,
            "confidence": _fmt(float(crop_probs[j, k])) if areas[j] > 0 else "",
            "weight": _fmt(float(weights[j])),
        }
        row.update({f"prob_{c}": _fmt(p) for c, p in enumerate(crop_probs[j])})
        yield row


def named_rows(rows: Iterable[dict], names: dict[int, str]) -> Iterator[dict]:
    """``rows`` (image or crop rows, generated) with a ``name`` column after ``cluster``: the
    name of the cluster's class (``names``: cluster id -> name, :func:`anomalyncd.catalog.cluster_names`;
    empty for a cluster without one, e.g. -1, no anomaly found)."""
    for row in rows:
        out: dict = {}
        for c, v in row.items():
            out[c] = v
            if c == "cluster":
                out["name"] = names.get(int(v), "")
        yield out


def write_table(path: str | os.PathLike, rows: Iterable[dict], columns: list[str] | None = None) -> None:
    """Write ``rows`` (any iterable: a generator is consumed row by row) as CSV atomically
    (columns: those of the first row unless given)."""
    rows = iter(rows)
    first = next(rows, None)
    columns = columns or (list(first) if first is not None else [])
    rows = itertools.chain([first], rows) if first is not None else rows
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Read a CSV written by :func:`write_table`, checking that ``required`` columns exist."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; run the merge stage first (dvc repro merge)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; rerun the stage that writes it")
        return list(reader)


@dataclass(frozen=True)
class Merger:
    """Region merging with the settings it runs with: the ``merge`` stage builds it from
    ``params.yaml`` (and the model's normal class) and stores it in the attrs of its store
    (:meth:`attrs`); ``anomalyncd predict`` loads it from there (:meth:`from_attrs`), so an
    edited ``params.yaml`` does not change how a finished run merges."""

    strategy: str
    temperature: float
    no_anomaly: int  # :func:`no_anomaly_cluster`

    def attrs(self) -> dict:
        return {"strategy": self.strategy, "temperature": float(self.temperature), "no_anomaly": int(self.no_anomaly)}

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "Merger":
        missing = [k for k in ("strategy", "temperature", "no_anomaly") if k not in attrs]
        if missing:
            raise InputError(f"{where}: has no merge settings {missing}; rerun merge (dvc repro)")
        return cls(str(attrs["strategy"]), float(attrs["temperature"]), int(attrs["no_anomaly"]))


def merge_tables(
    ids: list[str],
    images: list[str],
    categories: list[str],
    crop_ids: list[str],
    image_index: np.ndarray,
    boxes: np.ndarray,
    regions: np.ndarray,
    image_sizes: np.ndarray,
    areas: np.ndarray,
    scores: np.ndarray,
    crop_probs: np.ndarray,
    merger: Merger,
) -> tuple[Iterator[dict], Iterator[dict], MergeSet]:
    """Region merging of N images with M crops: the two tables (image rows, crop rows, as
    generators: write them with :func:`write_table`) and the same result as arrays for the store.

    The one code path behind the ``merge`` stage and ``anomalyncd predict``. ids, images,
    categories, image_sizes (N, 2) as (H, W); crop_ids, image_index, boxes and regions (M, 4)
    (:class:`anomalyncd.store.CropSet`), areas, scores: (M,); crop_probs (M, K) from
    :func:`novel_probabilities`.
    """
    merged = merge_regions(
        crop_probs, areas, image_index, len(ids), merger.strategy, merger.temperature, merger.no_anomaly
    )
    areas = np.asarray(areas)
    raw = np.argmax(crop_probs, axis=1) if len(crop_probs) else np.zeros(0, dtype=np.int64)
    crop_labels = np.where(areas > 0, raw, merger.no_anomaly)
    crop_conf = np.where(areas > 0, np.asarray(crop_probs)[np.arange(len(raw)), raw] if len(raw) else 0.0, np.nan)
    defect, context = table_boxes(boxes, regions, areas, image_index, image_sizes)
    img_rows = image_rows(ids, images, categories, merged, defect, context, image_index, crop_labels, merger.no_anomaly)
    crop_image_ids = [ids[i] for i in np.asarray(image_index).tolist()]
    c_rows = crop_rows(crop_ids, crop_image_ids, defect, context, areas, scores, crop_probs, merged.weights, crop_labels)
    store = MergeSet(
        ids=list(ids),
        clusters=merged.labels,
        confidence=merged.confidence,
        anomaly=merged.anomaly,
        probs=merged.probs.reshape(len(ids), np.asarray(crop_probs).shape[1]),
        crop_clusters=crop_labels,
        crop_confidence=np.asarray(crop_conf, np.float64).reshape(-1),
        weights=merged.weights,
        attrs=merger.attrs(),
    )
    return img_rows, c_rows, store
