"""Main Element Binarization (MEBin) and anomaly-centred crops (AnomalyNCD, CVPR 2025,
https://arxiv.org/abs/2410.14379).

MEBin binarizes each anomaly map with its own threshold: it sweeps the threshold from high to
low, counts connected components at each step and picks the end of the longest *stable
interval* (a run of equal, non-zero counts). The binary mask then gives square crop boxes
centred on each anomaly region; nearby boxes are merged and the largest ``est_count + 1`` kept.

Everything here is a pure function on arrays and, with ``erosion="paper"``, reproduces the
authors' published code on the same maps (the places where their code differs from a plain
reading of the paper are noted where they happen). The default ``keep_thin`` differs in one
place: regions the paper's 6 x 6 erosion would erase whole (scratches, cracks, small holes on a
128-pixel map) are kept (see :data:`EROSION_RULES`). The threshold sweep is computed without
one erosion and labelling pass per threshold: see :func:`count_sequence`.

Shapes: maps are ``uint8 (S, S)`` (any ``(h, w)`` works), images ``uint8 (H, W, 3)`` RGB,
masks ``bool (H, W)``, boxes ``int (m, 4)`` as ``(x0, y0, x1, y1)`` with ``x1, y1``
exclusive.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from .config import MebinParams
from .io import InputError
from .refine import refine_mask

#: The paper's rules 3 and 5: erode once with a 6 x 6 all-ones kernel (OpenCV's default anchor
#: and border).
ERODE_KERNEL = np.ones((6, 6), np.uint8)
#: How MEBin erodes each binarized map (``mebin.erosion``), which keeps specks of noise out of
#: its regions: ``paper`` erodes with ERODE_KERNEL, and so erases every region thinner than 6 map
#: pixels whatever its length (a scratch, a crack) and shrinks the others; ``keep_thin`` erodes
#: the same way but keeps, as they are, the regions the erosion would erase whole when they
#: have at least :func:`min_region_area` pixels; ``off`` keeps every pixel above the threshold
#: (pixel noise on maps at full image resolution then keeps the region count from settling).
EROSION_RULES = ("keep_thin", "paper", "off")
#: What MEBin does with an image whose map has no stable interval on the set's search range
#: (``mebin.fallback``), typically a real defect the detector scored low: ``own_range`` sweeps
#: again on the image's own range (its map's minimum to maximum), so every image handed to
#: MEBin gets its main element unless its map is flat; ``none`` reports it without anomaly,
#: as the paper does.
FALLBACKS = ("own_range", "none")
#: How MEBin's mask is drawn from the map's regions (``mebin.refine``): ``grabcut`` redraws
#: each region on the image (:mod:`anomalyncd.refine`), ``off`` keeps the map's region.
REFINERS = ("grabcut", "off")
#: ``keep_thin``: the smallest region kept is the kernel (36 pixels) on a 256-pixel map, scaled
#: with the map (9 pixels at the default ``detect.map_size`` of 128).
AREA_REFERENCE_SIDE = 256

Box = tuple[float, float, float, float]


@dataclass
class ImageResult:
    """MEBin's per-image result and diagnostics.

    threshold: the chosen threshold on the map's own 0..255 scale (255: no anomaly).
    est_count: the estimated number of anomaly regions (0: no anomaly).
    counts: int32 (T,) component counts along the sweep; entry ``j`` is at threshold
    ``255 - j * sample_rate`` on the rescaled axis (see :func:`sweep_thresholds`).
    mask: bool (H, W) the binary anomaly mask at image size: where the defects are (the stored
    mask, the report's outlines), the map's regions redrawn on the image with ``mebin.refine``.
    own_range: whether the threshold came from the image's own range (``fallback: own_range``).
    map_mask: bool (H, W) the map's regions at image size, before ``refine`` (``mask`` itself
    without it): what the crops, their masks and areas and the residual descriptors are drawn
    from. The classifier is given the region with its surroundings, which separates the defect
    types better than the tighter outline does (docs/discovery.md).
    """

    threshold: int
    est_count: int
    counts: np.ndarray
    mask: np.ndarray
    own_range: bool = False
    map_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.map_mask is None:
            self.map_mask = self.mask


@dataclass
class Crops:
    """The crops of one image, largest box first.

    crops: uint8 (m, C, C, 3) RGB; crop_masks: uint8 (m, C, C) in {0, 1}; boxes: int32 (m, 4)
    ``(x0, y0, x1, y1)`` in image pixels, which may reach outside the image (that part of the
    crop is black, as in the authors' code); regions: int32 (m, 4) the defect's own box, the
    extent of the crop's mask (the region's core where ``core`` > 0) in image pixels, always
    inside the image, zeros where the crop holds no region; areas: int64 (m,) mask pixels
    inside the box; scores: float32 (m,) in [0, 1].
    """

    crops: np.ndarray
    crop_masks: np.ndarray
    boxes: np.ndarray
    regions: np.ndarray
    areas: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


# -- rules 1 to 5: thresholds and masks ------------------------------------------------------


def check_params(p: MebinParams) -> MebinParams:
    """Return ``p`` if every ``mebin`` param is in range, else raise ``InputError`` naming it."""
    rules = {
        "sample_rate": (p.sample_rate >= 1, ">= 1"),
        "min_interval_len": (p.min_interval_len >= 1, ">= 1"),
        "padding": (p.padding >= 0, ">= 0"),
        "core": (isinstance(p.core, (int, float)) and 0 <= p.core < 1, "in [0, 1) (0: the whole region; auto is resolved by config.load_params)"),
        "min_crop_size": (0 <= p.min_crop_size <= 0.5, "in [0, 0.5]"),
        "max_merge_dist": (p.max_merge_dist >= 0, ">= 0"),
        "crop_size": (isinstance(p.crop_size, int) and p.crop_size >= 1, ">= 1 (auto is resolved by config.load_params)"),
        "workers": (p.workers >= 0, ">= 0 (0: one per CPU core)"),
        "fallback": (p.fallback in FALLBACKS, f"one of {list(FALLBACKS)}"),
        "refine": (p.refine in REFINERS, f"one of {list(REFINERS)} (auto is resolved by config.load_params)"),
    }
    for name, (ok, limit) in rules.items():
        if not ok:
            raise InputError(f"params.yaml: mebin.{name} must be {limit}, got {getattr(p, name)!r}")
    return p


def check_map(map_u8: np.ndarray, name: str = "anomaly map") -> np.ndarray:
    """Return ``map_u8`` if it is a non-empty 2-D ``uint8`` array, else raise ``InputError``."""
    if not isinstance(map_u8, np.ndarray) or map_u8.dtype != np.uint8 or map_u8.ndim != 2 or map_u8.size == 0:
        desc = f"{map_u8.dtype} {map_u8.shape}" if isinstance(map_u8, np.ndarray) else type(map_u8).__name__
        raise InputError(f"{name}: expected a non-empty uint8 (H, W) array with values 0..255, got {desc}")
    return map_u8


def search_range(maps_u8: np.ndarray | Sequence[np.ndarray]) -> tuple[int, int]:
    """Rule 1: ``(lo, hi)``, the smallest and the largest per-map maximum over the whole set.

    maps_u8: uint8 (N, S, S), or N uint8 (H_i, W_i) arrays. Where every map has the same
    maximum (one map, constant maps) the paper's rescaling would divide by zero: ``lo`` becomes
    0 then, with a ``RuntimeWarning``.
    """
    if len(maps_u8) == 0:
        raise InputError("MEBin needs at least one anomaly map, got none")
    if isinstance(maps_u8, np.ndarray) and maps_u8.ndim == 3:
        if maps_u8.dtype != np.uint8 or maps_u8[0].size == 0:
            raise InputError(f"anomaly maps: expected uint8 (N, H, W), got {maps_u8.dtype} {maps_u8.shape}")
        peaks = maps_u8.reshape(len(maps_u8), -1).max(axis=1)
    else:
        peaks = np.array([check_map(m, f"anomaly map {i}").max() for i, m in enumerate(maps_u8)])
    lo, hi = int(peaks.min()), int(peaks.max())
    if hi == lo:
        warnings.warn(
            f"MEBin search range is empty: every anomaly map peaks at {hi}; using lo = 0 instead "
            "(the paper's rescaling would divide by zero)",
            RuntimeWarning,
            stacklevel=2,
        )
        lo = 0
    return lo, hi


def _check_range(lo: int, hi: int) -> None:
    if not (0 <= lo <= hi <= 255):
        raise InputError(f"MEBin search range must satisfy 0 <= lo <= hi <= 255, got lo={lo}, hi={hi}")


def rescale(map_u8: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rule 2: float64 (H, W): 0 below ``lo``, else ``(v - lo) / (hi - lo) * 255``.

    ``hi == lo`` only happens when every map is all zero (see :func:`search_range`): the
    result is all zero then. Values above ``hi`` (new images scored with a stored range) go
    above 255.
    """
    _check_range(lo, hi)
    v = check_map(map_u8).astype(np.float64)
    if hi == lo:
        return np.zeros_like(v)
    return np.where(map_u8 < lo, 0.0, (v - lo) / (hi - lo) * 255)


def sweep_thresholds(sample_rate: int) -> np.ndarray:
    """Rule 3's thresholds on the rescaled axis: int64 (T,) ``255, 255 - s, ...`` while > 0."""
    if sample_rate < 1:
        raise InputError(f"params.yaml: mebin.sample_rate must be >= 1, got {sample_rate}")
    return np.arange(255, 0, -sample_rate, dtype=np.int64)


def _first_step_lut(lo: int, hi: int, sample_rate: int) -> np.ndarray:
    """uint8 (256,): for each map value, the first sweep step at which it is foreground (T: never).

    A rescaled value r is foreground at integer threshold t iff r > t iff ceil(r) > t, so the
    first step is the number of thresholds >= ceil(r).
    """
    ts = sweep_thresholds(sample_rate)
    r = rescale(np.arange(256, dtype=np.uint8)[None], lo, hi)[0]
    first = len(ts) - np.searchsorted(ts[::-1], np.ceil(r), side="left")
    return first.astype(np.uint8)


def _check_rule(erosion: str) -> str:
    if erosion not in EROSION_RULES:
        raise InputError(f"params.yaml: mebin.erosion must be one of {list(EROSION_RULES)}, got {erosion!r}")
    return erosion


def min_region_area(shape: tuple[int, ...]) -> int:
    """``erosion: keep_thin``: the fewest pixels an erased region of a map of ``shape`` (h, w) needs,
    ``36 * (max(h, w) / 256) ** 2`` rounded, at least 1."""
    return max(1, round(ERODE_KERNEL.size * (max(shape[:2]) / AREA_REFERENCE_SIDE) ** 2))


def _thin_regions(fg: np.ndarray, eroded: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, keep)``: the 8-connected regions of ``fg`` (uint8 (h, w) in {0, 1}) and, per
    label, whether the erosion erased it whole (no pixel of it in ``eroded``) and it has at
    least ``min_area`` pixels: the regions ``keep_thin`` adds to the eroded mask."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_area) & (np.bincount(labels[eroded > 0], minlength=n) == 0)
    keep[0] = False  # the background
    return labels, keep


def count_sequence(
    map_u8: np.ndarray, lo: int, hi: int, sample_rate: int, erosion: str
) -> np.ndarray:
    """Rule 3: int32 (T,) 8-connected region counts along the threshold sweep.

    Same result as binarizing the rescaled map at every threshold, eroding it
    (:data:`EROSION_RULES`) and labelling, but much faster:

    - erosion commutes with thresholding (eroding ``{r > t}`` is thresholding the
      min-filtered map), and min-filtering commutes with the monotone rescaling, so the 8-bit
      map is eroded once and every pixel of the map and of the eroded map is mapped, through a
      256-entry table, to the first sweep step at which it is foreground;
    - the foreground only changes at steps where some pixel enters, so only those are
      labelled; steps before the first entry count 0, and each labelled count holds until the
      next entry;
    - labelling runs on the bounding box of the pixels that are ever foreground.
    """
    check_map(map_u8)
    _check_range(lo, hi)
    rule = _check_rule(erosion)
    n_steps = len(sweep_thresholds(sample_rate))
    lut = _first_step_lut(lo, hi, sample_rate)
    first = cv2.LUT(map_u8, lut)  # the eroded map's foreground lies inside this one's
    first_eroded = cv2.LUT(cv2.erode(map_u8, ERODE_KERNEL), lut) if rule != "off" else first
    min_area = min_region_area(map_u8.shape)
    counts = np.zeros(n_steps, np.int32)
    steps = first_eroded if rule == "paper" else first
    entries = np.flatnonzero(np.bincount(steps.ravel(), minlength=n_steps + 1)[:n_steps])
    if entries.size == 0:
        return counts
    ever = steps < n_steps
    rows, cols = np.flatnonzero(ever.any(axis=1)), np.flatnonzero(ever.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    box, box_eroded = first[window], first_eroded[window]
    for step, until in zip(entries, [*entries[1:], n_steps]):
        eroded = (box_eroded <= step).view(np.uint8)
        counts[step:until] = cv2.connectedComponents(eroded, connectivity=8)[0] - 1
        if rule == "keep_thin":
            counts[step:until] += int(_thin_regions((box <= step).view(np.uint8), eroded, min_area)[1].sum())
    return counts


def stable_threshold(
    counts: np.ndarray, lo: int, hi: int, sample_rate: int, min_interval_len: int
) -> tuple[int, int]:
    """Rule 4: ``(threshold, est_count)`` from a count sequence (int (T,)).

    A stable interval is a maximal run of equal, non-zero counts at least
    ``min_interval_len`` steps long. None: ``(255, 0)``, the image has no anomaly. Otherwise the
    estimated count is the count whose longest run, measured as (last - first) index, is the
    longest (ties: the count that first qualified along the sweep); of its runs the longest is
    taken (ties: the later one); its last index ``i`` gives ``t = 255 - i * sample_rate``,
    mapped back to the map's scale as ``int(t * (hi - lo) / 255 + lo)``.

    The mapping is computed with Python integers: the authors' code did it with NumPy 1, where
    an int times a ``uint8`` scalar was promoted to int64; under NumPy 2 the same expression
    stays ``uint8`` and wraps around.
    """
    if min_interval_len < 1:
        raise InputError(f"params.yaml: mebin.min_interval_len must be >= 1, got {min_interval_len}")
    _check_range(lo, hi)
    seq = [int(c) for c in counts]
    runs: dict[int, list[tuple[int, int]]] = {}  # count -> its qualifying runs, in sweep order
    start = 0
    for i in range(1, len(seq) + 1):
        if i == len(seq) or seq[i] != seq[start]:
            if seq[start] != 0 and i - start >= min_interval_len:
                runs.setdefault(seq[start], []).append((start, i - 1))
            start = i
    if not runs:
        return 255, 0
    longest = {c: max(last - first for first, last in rs) for c, rs in runs.items()}
    est = max(longest, key=longest.__getitem__)  # first maximum: the count that qualified first
    best = runs[est][0]
    for first, last in runs[est][1:]:
        if last - first >= best[1] - best[0]:  # ties: the later run
            best = (first, last)
    t = 255 - best[1] * int(sample_rate)
    return int(t * (int(hi) - int(lo)) / 255 + int(lo)), est


def binarize(map_u8: np.ndarray, threshold: int, erosion: str) -> np.ndarray:
    """Rule 5: bool (H, W), the map strictly above ``threshold``, eroded as :func:`count_sequence`
    erodes it (see :data:`EROSION_RULES`)."""
    fg = (check_map(map_u8) > threshold).astype(np.uint8)
    rule = _check_rule(erosion)
    if rule == "off":
        return fg.astype(bool)
    eroded = cv2.erode(fg, ERODE_KERNEL)
    if rule == "paper":
        return eroded.astype(bool)
    labels, keep = _thin_regions(fg, eroded, min_region_area(fg.shape))
    return keep[labels] | (eroded > 0)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Rule 6: bool (H, W), ``mask`` resized to ``size = (H, W)`` nearest-neighbour (OpenCV)."""
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


# -- rules 7 and 8: crop boxes ---------------------------------------------------------------


def region_boxes(mask: np.ndarray, padding: float, min_crop_size: float) -> list[tuple[int, int, int, int]]:
    """Rule 7: one square box per external contour of ``mask`` (bool (H, W)).

    Contours' bounding rectangles are taken in ascending order of area (ties: by x, y, w, h);
    each gives a square of half-side ``r = max(int(max(w, h) * (1 + padding) * 0.5),
    int(max(H, W) * min_crop_size))``, capped at ``int(max(H, W) * 0.5)`` and at least 1,
    centred on the rectangle's integer midpoint and shifted back inside the image where it
    crosses a border (a square wider than the image stays anchored at 0). No contour: one box,
    the whole image.
    """
    h_img, w_img = mask.shape
    side = max(h_img, w_img)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [(0, 0, w_img, h_img)]
    rects = sorted((w * h, x, y, w, h) for x, y, w, h in map(cv2.boundingRect, contours))
    boxes = []
    for _, x, y, w, h in rects:
        cx, cy = int((2 * x + w) * 0.5), int((2 * y + h) * 0.5)
        r = max(int(max(h, w) * (1 + padding) * 0.5), int(side * min_crop_size))
        r = max(min(r, int(side * 0.5)), 1)
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
        if x0 < 0:
            x0, x1 = 0, 2 * r
        elif x1 > w_img:
            x0, x1 = w_img - 2 * r, w_img
        if y0 < 0:
            y0, y1 = 0, 2 * r
        elif y1 > h_img:
            y0, y1 = h_img - 2 * r, h_img
        boxes.append((x0, y0, x1, y1))
    return boxes


def box_gap(a: Box, b: Box) -> float:
    """Distance between two boxes ``(x0, y0, x1, y1)``: -1 if they overlap, 0 if they touch."""
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2  # centre distances
    dy = abs((a[1] + a[3]) - (b[1] + b[3])) / 2
    gap_x = dx - ((a[2] - a[0]) + (b[2] - b[0])) / 2
    gap_y = dy - ((a[3] - a[1]) + (b[3] - b[1])) / 2
    if gap_x < 0 and gap_y < 0:
        return -1.0
    if gap_x < 0:
        return gap_y
    if gap_y < 0:
        return gap_x
    return math.sqrt(gap_x * gap_x + gap_y * gap_y)


def _square(box: Box) -> Box:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w > h:
        return (x0, y0 - (w - h) / 2, x1, y1 + (w - h) / 2)
    if h > w:
        return (x0 - (h - w) / 2, y0, x1 + (h - w) / 2, y1)
    return box


def merge_boxes(boxes: Sequence[Box], max_dist: int) -> list[Box]:
    """Rule 8: merge boxes closer than ``max_dist`` pixels; largest first.

    Each box's group is every box at a :func:`box_gap` below ``max_dist`` (itself included,
    overlapping boxes always). Groups contained in another group are dropped. Each remaining
    group, sorted, becomes the union of its boxes, made square by growing the shorter side
    equally on both sides; as in the authors' code the square is taken after each box is added,
    which differs from squaring the final union when three or more boxes merge. Coordinates may
    become half-integers. The result is sorted by area, largest first (stable).
    """
    boxes = [tuple(b) for b in boxes]
    groups: list[list[Box]] = []
    for a in dict.fromkeys(boxes):
        group = sorted(b for b in boxes if box_gap(a, b) < max_dist)
        if group not in groups:
            groups.append(group)
    kept = [g for g in groups if not any(h != g and set(g) <= set(h) for h in groups)]
    merged = []
    for group in kept:
        box = group[0]
        for other in group[1:]:
            box = _square((min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3])))
        merged.append(box)
    return sorted(merged, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def crop_boxes(
    mask: np.ndarray, est_count: int, padding: float, min_crop_size: float, max_merge_dist: float
) -> np.ndarray:
    """Rules 7 and 8: int32 (m, 4) crop boxes of a bool (H, W) mask, largest first.

    At most ``est_count + 1`` boxes are kept. Half-integer coordinates from merging are
    rounded with Python's ``round`` (half to even), as PIL's crop does in the authors' code.
    """
    boxes = region_boxes(mask, padding, min_crop_size)
    merged = merge_boxes(boxes, int(max(mask.shape) * max_merge_dist))[: est_count + 1]
    return np.array([[round(v) for v in b] for b in merged], dtype=np.int32).reshape(-1, 4)


# -- rule 9: crops and scores ----------------------------------------------------------------


def mask_extent(mask: np.ndarray, offset: Sequence[int] = (0, 0)) -> tuple[int, int, int, int]:
    """The bounding box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the non-zero pixels of
    ``mask`` (h, w), shifted by ``offset = (x, y)``; ``(0, 0, 0, 0)`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0, 0, 0, 0)
    dx, dy = (int(v) for v in offset)
    return (int(xs.min()) + dx, int(ys.min()) + dy, int(xs.max()) + 1 + dx, int(ys.max()) + 1 + dy)


def crop_padded(arr: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """``arr[y0:y1, x0:x1]`` for a box that may reach outside ``arr``; outside is zero."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.zeros((y1 - y0, x1 - x0) + arr.shape[2:], arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, arr.shape[1]), min(y1, arr.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def resize_short_side(arr: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resize (PIL) so the shorter side is ``size`` and keep the top-left ``size x size``.

    arr: uint8 (h, w) or (h, w, 3). This is exactly what the classifier's transforms see
    (torchvision's ``resize(size)`` followed by crops inside the top-left square), so a square
    crop is simply resized and a non-square one keeps the part those transforms would use.
    """
    h, w = arr.shape[:2]
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return np.asarray(Image.fromarray(arr).resize((new_w, new_h), resample))[:size, :size]


def score_map(map_u8: np.ndarray, lo: int, hi: int, size: tuple[int, int]) -> np.ndarray:
    """The rescaled map (rule 2) resized to ``size = (H, W)``: float32 (H, W).

    Resized like the authors' code does: a float32 PIL image with PIL's default (bicubic)
    filter, which can overshoot slightly around sharp peaks.
    """
    r = rescale(map_u8, lo, hi).astype(np.float32)
    h, w = size
    if r.shape == (h, w):
        return r
    return np.asarray(Image.fromarray(r).resize((w, h), Image.Resampling.BICUBIC))


def extract_crops(
    image: np.ndarray, mask: np.ndarray, scores: np.ndarray, boxes: np.ndarray, crop_size: int, core: float
) -> Crops:
    """Rule 9: image and mask crops of each box, resized to ``crop_size``, and their scores.

    image: uint8 (H, W, 3); mask: bool (H, W); scores: float32 (H, W) on the 0..255 scale
    (:func:`score_map`); boxes: int (m, 4). A crop's score is the maximum of ``scores`` in its
    box (black padding outside the image counts as 0) divided by 255, clipped to [0, 1].
    Images are resized bilinearly, masks nearest-neighbour (:func:`resize_short_side`).
    ``core`` > 0 (not in the paper): the crop mask keeps only the region's pixels scoring at
    least ``core`` times the highest score of the region in the box (:func:`core_mask`); the
    box, the area and the score stay those of the whole region. Each crop's ``regions`` entry
    is the extent of its mask (:func:`mask_extent`): where the defect is, inside the image.
    """
    if crop_size < 1:
        raise InputError(f"params.yaml: mebin.crop_size must be >= 1, got {crop_size}")
    crops = np.zeros((len(boxes), crop_size, crop_size, 3), np.uint8)
    crop_masks = np.zeros((len(boxes), crop_size, crop_size), np.uint8)
    areas = np.zeros(len(boxes), np.int64)
    regions = np.zeros((len(boxes), 4), np.int32)
    out_scores = np.zeros(len(boxes), np.float32)
    mask_u8 = mask.astype(np.uint8)
    for k, box in enumerate(boxes):
        m = crop_padded(mask_u8, box)
        s = crop_padded(scores, box)
        crops[k] = resize_short_side(crop_padded(image, box), crop_size, Image.Resampling.BILINEAR)
        kept = core_mask(m, s, core)
        crop_masks[k] = resize_short_side(kept, crop_size, Image.Resampling.NEAREST)
        regions[k] = mask_extent(kept, box[:2])
        areas[k] = int(m.sum())
        out_scores[k] = np.clip(s.max() / 255.0, 0.0, 1.0)
    return Crops(crops, crop_masks, np.asarray(boxes, np.int32).reshape(-1, 4), regions, areas, out_scores)


def core_mask(mask: np.ndarray, scores: np.ndarray, core: float) -> np.ndarray:
    """The pixels of ``mask`` scoring at least ``core`` times its highest score: uint8 (h, w).

    mask: uint8 (h, w) in {0, 1}; scores: float (h, w). On a smooth detector map MEBin's
    region is several times the defect (its threshold sits in the map's tails); its core is
    where the defect is, and pooling the classifier's features there rather than over the
    whole region separates the defect types better (docs/discovery.md). A region whose
    highest score is 0 or below (possible on the own-range fallback, whose regions lie under
    the set's range), ``core`` 0, and an empty mask give ``mask`` unchanged.
    """
    if core <= 0 or not mask.any():
        return mask
    peak = scores[mask > 0].max()
    if peak <= 0:
        return mask
    return (mask > 0).astype(np.uint8) & (scores >= core * peak)


# -- the whole per-image job -----------------------------------------------------------------


def mebin_image(
    map_u8: np.ndarray, image: np.ndarray, lo: int, hi: int, params: MebinParams
) -> tuple[ImageResult, Crops]:
    """MEBin for one image, given the set's search range ``(lo, hi)`` (:func:`search_range`).

    map_u8: uint8 (S, S) anomaly map, at any resolution; image: uint8 (H, W, 3) RGB. Used by
    the ``mebin`` stage and, with a finished run's stored range, by ``predict``. Where the set's
    range gives no stable interval, ``params.fallback`` decides (:data:`FALLBACKS`); the
    result's ``counts`` are then those of the image's own range, and crop scores stay on the
    set's range, so a fallback image's crops keep their low scores.
    """
    check_params(params)
    check_map(map_u8)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image: expected a uint8 (H, W, 3) RGB array, got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image: empty image of shape {image.shape}")
    counts = count_sequence(map_u8, lo, hi, params.sample_rate, params.erosion)
    threshold, est = stable_threshold(counts, lo, hi, params.sample_rate, params.min_interval_len)
    own_range = est == 0 and params.fallback == "own_range"
    if own_range:
        own_lo, own_hi = int(map_u8.min()), int(map_u8.max())
        counts = count_sequence(map_u8, own_lo, own_hi, params.sample_rate, params.erosion)
        threshold, est = stable_threshold(counts, own_lo, own_hi, params.sample_rate, params.min_interval_len)
    size = image.shape[:2]
    map_mask = resize_mask(binarize(map_u8, threshold, params.erosion), size)
    boxes = crop_boxes(map_mask, est, params.padding, params.min_crop_size, params.max_merge_dist)
    crops = extract_crops(image, map_mask, score_map(map_u8, lo, hi, size), boxes, params.crop_size, params.core)
    mask = map_mask
    if params.refine == "grabcut" and map_mask.any():
        upsampled = cv2.resize(map_u8.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        mask = refine_mask(image, map_mask, upsampled, params.seed)
    return ImageResult(threshold, est, counts, mask, own_range, map_mask), crops


@dataclass(frozen=True)
class GtCoverage:
    """How much of the ground truth the crops of one or more images hold (counts, summable).

    regions: 8-connected ground-truth regions larger than ``min_area`` pixels. found: those
    with at least half of their pixels inside the crop boxes. whole: those whose bounding box
    lies inside one crop box (the strict reading, which a crop cut tight around its mask misses
    by a few pixels). pixels: every ground-truth pixel; pixels_in: those inside a crop box.
    """

    regions: int = 0
    found: int = 0
    whole: int = 0
    pixels: int = 0
    pixels_in: int = 0

    def __add__(self, other: "GtCoverage") -> "GtCoverage":
        return GtCoverage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def metrics(self) -> dict:
        """The ``metrics/mebin.json`` entries: counts and fractions (None without ground truth)."""
        return {
            "gt_regions": self.regions,
            "gt_regions_found": self.found / self.regions if self.regions else None,
            "gt_regions_whole_in_a_crop": self.whole / self.regions if self.regions else None,
            "gt_pixels_in_crops": self.pixels_in / self.pixels if self.pixels else None,
        }


def gt_coverage(gt_mask: np.ndarray, boxes: np.ndarray, areas: np.ndarray, min_area: int = 64) -> GtCoverage:
    """:class:`GtCoverage` of one image: ``gt_mask`` bool (H, W), its crops' ``boxes`` int (m, 4)
    and mask ``areas`` int (m,). Crops without mask pixels (the whole-image crop of an image
    where MEBin found nothing) hold no region and are left out."""
    gt = np.asarray(gt_mask, bool)
    boxes = np.asarray(boxes).reshape(-1, 4)[np.asarray(areas).reshape(-1) > 0]
    inside = np.zeros(gt.shape, bool)
    for x0, y0, x1, y1 in boxes:
        inside[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    n, labels, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8), connectivity=8)
    in_px = np.bincount(labels[inside & gt], minlength=n)
    found = whole = 0
    big = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] > min_area]
    for k in big:
        x, y, w, h, area = stats[k]
        found += 2 * in_px[k] >= area
        whole += bool(((boxes[:, 0] <= x) & (boxes[:, 1] <= y) & (boxes[:, 2] >= x + w) & (boxes[:, 3] >= y + h)).any())
    return GtCoverage(len(big), int(found), int(whole), int(gt.sum()), int((inside & gt).sum()))
