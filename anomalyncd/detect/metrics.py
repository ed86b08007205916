"""Detection metrics: image AUROC, pixel AUROC and AUPRO (pure functions).

AUPRO follows the MVTec AD definition: every connected ground-truth region counts once,
whatever its size; the per-region overlap (PRO) at a threshold is the mean, over regions, of
the fraction of the region's pixels at or above the threshold; the curve PRO(FPR) is
integrated from FPR 0 up to ``max_fpr`` (0.3) and divided by ``max_fpr``, so a perfect map
scores 1 and a random one about ``max_fpr / 2``.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of image scores ``(N,)`` against labels ``(N,)`` (1 = defective).

    Returns NaN when only one class is present (no normal or no defective image).
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over every pixel of ``maps`` float ``(N, S, S)`` against ``masks`` bool ``(N, S, S)``.

    NaN when the masks hold no defect pixel or nothing but defect pixels.
    """
    y = np.asarray(masks, dtype=bool).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(maps, dtype=np.float32).ravel()))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve over every distinct threshold.

    ``maps`` float ``(N, S, S)``, ``masks`` bool ``(N, S, S)``. Returns ``fpr`` and ``pro``,
    both ``(T + 1,)`` non-decreasing and starting at 0, one point per distinct map value
    (thresholds from the highest value down). Regions are the 8-connected components of each
    mask; FPR is over the pixels outside every mask.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        lab = lab.astype(np.int64)
        lab[lab > 0] += offset
        labels[i] = lab
        offset += n - 1
    n_regions = offset
    labels = labels.ravel()
    scores = maps.ravel()
    background = labels == 0
    n_bg = int(background.sum())
    if n_regions == 0 or n_bg == 0:
        raise ValueError("AUPRO needs at least one defect region and one defect-free pixel")
    region_size = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    # Each pixel of region r adds 1 / (|r| * R) to PRO once the threshold falls to its score.
    weight = np.where(background, 0.0, 1.0 / (region_size[labels] * n_regions))
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    fp = np.cumsum(background[order]) / n_bg
    pro = np.cumsum(weight[order])
    last = np.r_[s[1:] != s[:-1], True]  # the last pixel of each run of equal scores
    fpr = np.r_[0.0, fp[last]]
    pro = np.r_[0.0, np.minimum(pro[last], 1.0)]
    return fpr, pro


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in ``[0, max_fpr]``, divided by ``max_fpr``.

    ``maps`` float ``(N, S, S)``, ``masks`` bool ``(N, S, S)``. The curve is linearly
    interpolated at ``max_fpr``. NaN when the masks hold no region or no background.
    """
    masks = np.asarray(masks, dtype=bool)
    if not masks.any() or masks.all():
        return float("nan")
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:
        j = int(np.searchsorted(fpr, max_fpr))  # first point past max_fpr
        y_end = np.interp(max_fpr, fpr[j - 1 : j + 1], pro[j - 1 : j + 1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(np.trapezoid(y, x) / max_fpr)


def resize_masks(masks: list[np.ndarray], size: int) -> np.ndarray:
    """Resize full-size bool masks ``(H_i, W_i)`` to bool ``(N, size, size)`` (nearest)."""
    out = np.zeros((len(masks), size, size), dtype=bool)
    for i, m in enumerate(masks):
        out[i] = cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return out


def detection_metrics(
    maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray, max_fpr: float = 0.3
) -> dict[str, float]:
    """All detection figures at once.

    ``maps`` float ``(N, S, S)``, ``scores`` ``(N,)``, ``masks`` bool ``(N, S, S)`` (all zero for
    normal images), ``labels`` ``(N,)`` 1 for defective images. Keys: ``image_auroc``,
    ``pixel_auroc``, ``aupro`` (NaN where undefined).
    """
    return {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro": aupro(maps, masks, max_fpr),
    }
