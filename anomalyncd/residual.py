"""Region descriptors from the detector's residuals: how a region departs from normal.

PatchCore scores a patch by its distance to the nearest normal patch of its memory bank. The
difference itself, the patch's features minus those of that nearest normal patch (its
residual), says in which direction the patch departs from normal. Averaged over a region's
anomaly mask and scaled to unit length, it describes the defect with the part's own texture,
lighting and pose taken out (the nearest normal patch shares them) and without the anomaly's
strength (the length): two scratches on differently lit parts get close descriptors, which the
appearance of their crops does not give them. ``benchmarks/bench_residual.py`` measures them.
"""

from __future__ import annotations

import cv2
import numpy as np


def pool_regions(residuals: np.ndarray, mask: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Unit descriptors float32 ``(M, D)`` of ``M`` regions of one image.

    ``residuals`` float ``(h, w, D)``: a feature grid over the whole image; ``mask`` bool
    ``(H, W)``: the image's anomaly mask; ``regions`` int ``(M, 4)``: each region's box
    ``(x0, y0, x1, y1)`` in image pixels (all zeros: no box, the whole mask). Each region is the
    mean of the grid's cells weighted by the share of each cell that the mask covers inside the
    box (the box alone where the mask misses it, every cell where both are empty).
    """
    h, w, d = residuals.shape
    H, W = mask.shape
    flat = residuals.reshape(h * w, d).astype(np.float64)
    out = np.zeros((len(regions), d), np.float32)
    for j, (x0, y0, x1, y1) in enumerate(np.asarray(regions, np.int64).reshape(-1, 4)):
        weight = np.zeros((H, W), np.float32)
        if x1 > x0 and y1 > y0:
            weight[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
            if not weight.any():
                weight[y0:y1, x0:x1] = 1
        elif mask.any():
            weight[:] = mask
        cells = cv2.resize(weight, (w, h), interpolation=cv2.INTER_AREA).reshape(-1).astype(np.float64)
        if cells.sum() <= 0:
            cells = np.ones(h * w)
        v = cells @ flat / cells.sum()
        out[j] = v / max(np.linalg.norm(v), 1e-12)
    return out
