"""How well predicted anomaly regions hug the true defects (pure functions, arrays in and out).

Used by ``benchmarks/bench_regions.py`` to measure the chain detector -> MEBin -> crops on any
data set with masks. Region matching, per image:

- *true regions*: the 8-connected components of the true mask with more than ``min_area``
  pixels (smaller ones are not scored, but their pixels still count as defect);
- *predicted regions*: the 8-connected components of the predicted mask (MEBin's);
- true region ``r`` is matched to ``P_r``, the union of the predicted regions that share at
  least one pixel with it; ``r`` is *hit* when ``P_r`` is not empty. Pixels of ``P_r`` lying on
  *another* true region are left out of ``P_r`` for ``r``'s scores (one predicted blob over two
  defects is not charged twice):

  - recall ``|r & P_r| / |r|``,
  - precision ``|r & P_r| / |P_r|``,
  - IoU ``|r & P_r| / |r | P_r|``;

  a missed region has recall and IoU 0 and no precision (NaN: there is no predicted pixel to
  be precise about);
- *extra regions*: predicted regions that touch no true pixel (false alarms).

A mask equal to the defect scores IoU, precision and recall 1; a mask four times the defect's
area around it precision and IoU 0.25, recall 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class RegionScores:
    """Scores of the R true regions of one image (see the module docstring).

    iou, recall: float64 (R,); precision: float64 (R,), NaN where missed; hit: bool (R,);
    extra: predicted regions touching no true pixel.
    """

    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    hit: np.ndarray
    extra: int

    def __len__(self) -> int:
        return len(self.iou)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    n, labels = cv2.connectedComponents(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8)
    return n, labels


def region_scores(true_mask: np.ndarray, pred_mask: np.ndarray, min_area: int = 0) -> RegionScores:
    """Per-region IoU, precision and recall of ``pred_mask`` against ``true_mask``.

    true_mask, pred_mask: bool (H, W) of the same shape. True regions of ``min_area`` pixels
    or fewer are not scored.
    """
    true_mask = np.asarray(true_mask, bool)
    pred_mask = np.asarray(pred_mask, bool)
    if true_mask.shape != pred_mask.shape:
        raise ValueError(f"true mask {true_mask.shape} and predicted mask {pred_mask.shape} differ in shape")
    n_t, t_lab = _components(true_mask)
    n_p, p_lab = _components(pred_mask)
    t_area = np.bincount(t_lab.ravel(), minlength=n_t)
    p_area = np.bincount(p_lab.ravel(), minlength=n_p)
    # pixels shared by true region i and predicted region j: (n_t, n_p)
    both = np.zeros((n_t, n_p), np.int64)
    np.add.at(both, (t_lab[pred_mask], p_lab[pred_mask]), 1)
    scored = [i for i in range(1, n_t) if t_area[i] > min_area]
    iou, precision, recall, hit = [], [], [], []
    for i in scored:
        matched = np.flatnonzero(both[i, 1:] > 0) + 1
        inter = int(both[i, matched].sum())
        # P_r without the pixels on other true regions
        on_others = int(both[1:, matched].sum()) - inter
        p = int(p_area[matched].sum()) - on_others
        hit.append(len(matched) > 0)
        recall.append(inter / t_area[i])
        precision.append(inter / p if p else np.nan)
        iou.append(inter / (t_area[i] + p - inter))
    extra = int((both[1:, 1:].sum(axis=0) == 0).sum()) if n_p > 1 else 0
    f = lambda v: np.asarray(v, np.float64)  # noqa: E731
    return RegionScores(f(iou), f(precision), f(recall), np.asarray(hit, bool), extra)


def summarize(scores: Sequence[RegionScores]) -> dict:
    """Means over images of the per-image mean region IoU, precision and recall (images
    without a scored true region left out; precision over the hit regions, images without one
    left out), the region counts, and the extra regions per image."""

    def mean_of_means(name: str) -> float:
        per_image = [np.nanmean(getattr(s, name)) for s in scores if len(s) and not np.isnan(getattr(s, name)).all()]
        return float(np.mean(per_image)) if per_image else float("nan")

    regions = sum(len(s) for s in scores)
    return {
        "images": sum(1 for s in scores if len(s)),
        "regions": regions,
        "regions_hit": int(sum(int(s.hit.sum()) for s in scores)),
        "iou": mean_of_means("iou"),
        "precision": mean_of_means("precision"),
        "recall": mean_of_means("recall"),
        "extra_regions_per_image": float(np.mean([s.extra for s in scores])) if scores else float("nan"),
    }


def paste_crop_masks(shape: tuple[int, int], boxes: np.ndarray, crop_masks: Sequence[np.ndarray]) -> np.ndarray:
    """The crops' masks put back into the image: bool (H, W) for ``shape = (H, W)``.

    boxes: int (m, 4) ``(x0, y0, x1, y1)`` in image pixels (may reach outside the image);
    crop_masks: m arrays (C, C), each the top-left square of its box (the whole box: MEBin's
    boxes are square) resized to C (``anomalyncd.mebin.extract_crops``). Each is resized back to its box (nearest) and the union
    taken: the mask the classifier pools over, at the crop's resolution.
    """
    h, w = shape
    out = np.zeros((h, w), bool)
    for (x0, y0, x1, y1), cm in zip(np.asarray(boxes).reshape(-1, 4).tolist(), crop_masks):
        bw, bh = x1 - x0, y1 - y0
        if bw <= 0 or bh <= 0 or not np.any(cm):
            continue
        side = min(bw, bh)  # the crop is the box's top-left square scaled to C
        m = np.zeros((bh, bw), bool)
        m[:side, :side] = cv2.resize(np.asarray(cm, np.uint8), (side, side), interpolation=cv2.INTER_NEAREST) > 0
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0:sy1, sx0:sx1] |= m[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return out


def without_stable_interval(map_u8: np.ndarray, lo: int, hi: int, params) -> bool:
    """Whether MEBin finds no stable interval for ``map_u8`` uint8 (S, S) on the set's search
    range ``(lo, hi)`` with the ``mebin`` params ``params``: the images that ``fallback:
    own_range`` searches again on their own range (``none``: reported without anomaly)."""
    from . import mebin

    counts = mebin.count_sequence(map_u8, lo, hi, params.sample_rate, params.erosion)
    return mebin.stable_threshold(counts, lo, hi, params.sample_rate, params.min_interval_len)[1] == 0
