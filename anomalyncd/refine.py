"""MEBin's regions redrawn on the image: GrabCut inside each region, seeded by the anomaly map.

A detector's map is coarse: its cells are several image pixels, and the smoothing that makes
its image score and its regions stable widens every peak. A small or thin defect (a hole, a
crack) then gets a region several times its area, and an outline drawn from the map shows
mostly the surface around it. The image itself still shows where the defect ends: its
colours differ from the surface's and its outline is an edge. GrabCut (Rother et al. 2004,
OpenCV's ``cv2.grabCut``) separates two colour models along image edges; here it is seeded by
the map, never by hand:

- outside the region (in a box around it): surface, for certain;
- the region's core (at least half-way from its lowest to its highest score): probably defect;
- the rest of the region: probably surface.

GrabCut's defect pixels inside the region become the region's mask. Where it finds no defect
in the region or takes the whole region (less than :data:`KEEP_BELOW` or more than
:data:`KEEP_ABOVE` of it: a defect of the surface's own colours, or one that fills the region),
the map's region stands. A region only ever shrinks. MEBin stores the result as its mask (the
report's outlines); the crops, their masks and areas and the residual descriptors stay drawn
from the map's regions, because the classifier tells the defect types apart better with the
surroundings than with the tight outline (docs/discovery.md). Shapes: image uint8 (H, W, 3)
RGB, mask bool (H, W), scores float32 (H, W).
"""

from __future__ import annotations

import cv2
import numpy as np

#: The seed: region pixels at least this far from the region's lowest to its highest score.
CORE = 0.5
#: GrabCut runs on the region's box shrunk to at most this many pixels a side (a few ms a
#: region, whatever the image size); its result is resized back (nearest).
MAX_SIDE = 96
#: GrabCut's iterations (OpenCV's examples use 1 to 5; the result settles within a few).
ITERATIONS = 3
#: The box around a region is grown by this fraction of its size a side (at least MARGIN_PX),
#: so that GrabCut sees the surface around the region.
MARGIN = 0.25
MARGIN_PX = 8
#: GrabCut's result replaces the region only when it keeps between these fractions of it.
KEEP_BELOW, KEEP_ABOVE = 0.02, 0.98
#: GrabCut needs this many pixels of each seed to fit its colour models.
MIN_SEED = 10


def refine_mask(image: np.ndarray, mask: np.ndarray, scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """bool (H, W): each 8-connected region of ``mask`` replaced by GrabCut's defect pixels in it
    (see the module docstring). Deterministic: OpenCV's random generator, which GrabCut's
    k-means initialisation draws from, is seeded with ``seed`` before each region."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    out = np.zeros(mask.shape, bool)
    for r in range(1, n):
        region = labels == r
        out |= refine_region(image, region, scores, seed)
    return out


def refine_region(image: np.ndarray, region: np.ndarray, scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """bool (H, W): GrabCut's defect pixels inside ``region`` (bool (H, W), one region), or the
    region itself where GrabCut cannot separate it (see the module docstring)."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    if not len(ys):
        return region
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    my, mx = max(MARGIN_PX, int((y1 - y0) * MARGIN)), max(MARGIN_PX, int((x1 - x0) * MARGIN))
    y0, y1, x0, x1 = max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)
    reg = region[y0:y1, x0:x1]
    s = scores[y0:y1, x0:x1]
    lo, hi = float(s[reg].min()), float(s[reg].max())
    seeds = np.full(reg.shape, cv2.GC_BGD, np.uint8)
    seeds[reg] = cv2.GC_PR_BGD
    seeds[reg & (s >= lo + CORE * (hi - lo))] = cv2.GC_PR_FGD
    scale = min(1.0, MAX_SIDE / max(reg.shape))
    size = (max(1, round(reg.shape[1] * scale)), max(1, round(reg.shape[0] * scale)))
    small = cv2.resize(seeds, size, interpolation=cv2.INTER_NEAREST) if scale < 1 else seeds
    if (small == cv2.GC_BGD).sum() < MIN_SEED or (small == cv2.GC_PR_FGD).sum() < MIN_SEED or hi <= lo:
        return region
    crop = np.ascontiguousarray(image[y0:y1, x0:x1, ::-1])  # OpenCV's BGR order
    if scale < 1:
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    cv2.setRNGSeed(int(seed))
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(crop, small, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # colour models it cannot fit (too few distinct colours): the map's region
        return region
    if scale < 1:
        small = cv2.resize(small, (reg.shape[1], reg.shape[0]), interpolation=cv2.INTER_NEAREST)
    defect = ((small == cv2.GC_FGD) | (small == cv2.GC_PR_FGD)) & reg
    kept = defect.sum() / reg.sum()
    if not KEEP_BELOW < kept < KEEP_ABOVE:
        return region
    out = np.zeros_like(region)
    out[y0:y1, x0:x1] = defect
    return out
