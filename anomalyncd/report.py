"""The static HTML report of a run: ``reports/index.html`` plus image files beside it.

Top of the page, for the people who act on it: the summary (:func:`_summary`): the defect
types found with their names where known and their numbers of images, a strip of examples of
each type cut around the defect, the least certain images to review, and what to do next. Then
what the thumbnails show, any warning, and one section per discovered class with a gallery:
for each image its main crop with MEBin's mask, the true mask and the defect's box outlined,
beside the anomaly map over the same crop; each links to the full image with every defect's box.
Then the images of the clusters the catalog rejects as not a defect, and those where MEBin found
no anomaly. The classes are the catalog's curated classes (``classes.yaml``,
:mod:`anomalyncd.catalog`): their names, merged clusters shown as one class, and the catalog
itself in the summary. Folded below, for research: the
class-discovery, detection and MEBin metrics, the number of classes (the estimate and its score
chart), the training curves, the per-type tables and the image-level confusion matrix (when
ground truth exists), the MEBin threshold sweeps of a few images, and the parameters of the run. The page has no scripts and no external resources, so it opens
offline; images (charts included, drawn with matplotlib) are separate files so the page stays
small.

Drawing helpers are pure (arrays in, arrays out); :func:`write_report` does the file I/O.
"""

from __future__ import annotations

import csv
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .catalog import REJECTED, REJECTED_ID
from .io import atomic_path, read_image, read_mask, write_image
from .mebin import crop_padded
from .num_classes import estimate_summary

THUMB_SIZE = 160
STRIP_SIZE = 200  # the summary's examples, cut around the defect
STRIP_IMAGES = 5  # examples per type in the summary: one row on a 1280-px screen
REVIEW_IMAGES = 5  # least certain images in the summary: one row
BOX_COLOR = (255, 64, 160)  # magenta: the defect's box
FULL_MAX_SIDE = 768
FULL_MIN_SIDE = 384
PANEL_GAP = 4
MEBIN_COLOR = (255, 215, 0)  # yellow: MEBin's mask
TRUE_COLOR = (0, 229, 255)  # cyan: the dataset's mask
NO_ANOMALY_LABEL = "no anomaly found"
#: training curves drawn in the report: losses on the left, schedules on the right
LOSS_CURVES = ("loss", "distill", "contrastive", "memax")
SCHEDULE_CURVES = ("lr", "teacher_temp")


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours (tab10, then tab20, then evenly spaced hues)."""
    from matplotlib import colormaps

    if n <= 10:
        cols = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [colormaps["hsv"](i / n) for i in range(n)]
    return [tuple(int(round(255 * c)) for c in col[:3]) for col in cols]


def draw_outline(rgb: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int], thickness: int = 1) -> np.ndarray:
    """``rgb`` (h, w, 3) with the outline of ``mask`` (h', w') drawn (resized nearest-neighbour
    to (h, w) first); ``None`` or an empty mask draws nothing. Returns a new array."""
    out = np.ascontiguousarray(rgb).copy()
    if mask is None or not np.any(mask):
        return out
    m = cv2.resize(np.asarray(mask, np.uint8), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, thickness=thickness, lineType=cv2.LINE_AA)
    return out


def outline_thumbnail(
    crop: np.ndarray, mask: np.ndarray, size: int = THUMB_SIZE, color: tuple[int, int, int] = MEBIN_COLOR
) -> np.ndarray:
    """Resize an RGB crop (C, C, 3) to (size, size, 3) and draw its mask's (C, C) outline."""
    thumb = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_LINEAR)
    return draw_outline(thumb, mask, color, max(1, size // 96))


def map_overlay(rgb: np.ndarray, map_u8: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The anomaly map (h', w') uint8 0..255, resized bilinearly to the image (h, w, 3), in the
    jet colours (blue low, red high) blended over it with weight ``alpha``: uint8 (h, w, 3)."""
    m = cv2.resize(np.asarray(map_u8, np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(m, cv2.COLORMAP_JET)[:, :, ::-1]
    return cv2.addWeighted(np.ascontiguousarray(rgb), 1 - alpha, heat, alpha, 0)


def fit_square(rgb: np.ndarray, size: int, fill: int = 255) -> np.ndarray:
    """``rgb`` (h, w, 3) scaled so its longer side is ``size`` and centred on a ``fill`` square
    (size, size, 3), so that whole non-square images keep their shape in a gallery."""
    h, w = rgb.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.full((size, size, 3), fill, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y : y + nh, x : x + nw] = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_AREA)
    return out


def region_panels(
    image: np.ndarray,
    box: Sequence[int],
    mebin_mask: np.ndarray | None,
    true_mask: np.ndarray | None,
    map_u8: np.ndarray | None,
    size: int = THUMB_SIZE,
    defect: Sequence[int] | None = None,
) -> np.ndarray:
    """Two panels of one box (x0, y0, x1, y1) of an image (H, W, 3), side by side:
    uint8 (size, 2 * size + PANEL_GAP, 3).

    Left, the image with MEBin's mask (yellow) and the true mask (cyan) outlined, and the
    defect's box ``defect`` (image pixels) in magenta; right, the anomaly map (S, S) over it
    (:func:`map_overlay`). Masks are bool (H, W) or None; parts of the box outside the image
    are black, as in the crops.
    """
    crop = crop_padded(image, box)
    thick = max(1, size // 96)

    def cut(mask):
        return None if mask is None else crop_padded(np.asarray(mask, np.uint8), box)

    left = fit_square(crop, size)
    right = fit_square(crop, size)
    if map_u8 is not None:
        full = cv2.resize(np.asarray(map_u8, np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        right = fit_square(map_overlay(crop, crop_padded(full, box)), size)
    for mask, color in ((cut(mebin_mask), MEBIN_COLOR), (cut(true_mask), TRUE_COLOR)):
        if mask is not None:
            left = draw_outline(left, _fit_mask(mask, size), color, thick)
    if defect is not None:
        marked = np.zeros((image.shape[0], image.shape[1]), np.uint8)
        marked[defect[1] : defect[3], defect[0] : defect[2]] = 1
        left = draw_outline(left, _fit_mask(crop_padded(marked, box), size), BOX_COLOR, thick)
    gap = np.full((size, PANEL_GAP, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def _fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask placed as :func:`fit_square` places its image: uint8 (size, size)."""
    return fit_square(np.repeat(np.asarray(mask, np.uint8)[:, :, None] * 255, 3, axis=2), size, fill=0)[:, :, 0] > 127


def around_box(box: Sequence[int], shape: Sequence[int], margin: float = 0.5, min_side: int = 32) -> tuple[int, int, int, int]:
    """A square around ``box`` (x0, y0, x1, y1): its longer side grown by ``margin`` on each
    side (at least ``min_side``), centred on it and moved, then cut, to lie inside an image of
    ``shape`` (H, W, ...): what the summary shows of a defect."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (int(v) for v in box)
    side = min(max(round(max(x1 - x0, y1 - y0) * (1 + 2 * margin)), min_side), max(h, w))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    ax0 = min(max(cx - side // 2, 0), max(w - side, 0))
    ay0 = min(max(cy - side // 2, 0), max(h - side, 0))
    return ax0, ay0, min(ax0 + side, w), min(ay0 + side, h)


def defect_thumbnail(image: np.ndarray, region: Sequence[int] | None, size: int = STRIP_SIZE) -> np.ndarray:
    """The part of ``image`` (H, W, 3) around the defect's box ``region`` (:func:`around_box`;
    the whole image without one) with the box drawn, nothing else over the defect: uint8 (size, size, 3)."""
    h, w = image.shape[:2]
    view = around_box(region, (h, w)) if region is not None else (0, 0, w, h)
    x0, y0, x1, y1 = view
    out = fit_square(image[y0:y1, x0:x1], size)
    scale = size / max(x1 - x0, y1 - y0)
    dx, dy = (size - round((x1 - x0) * scale)) // 2, (size - round((y1 - y0) * scale)) // 2
    if region is not None:
        p0 = (dx + int((region[0] - x0) * scale), dy + int((region[1] - y0) * scale))
        p1 = (dx + int(round((region[2] - x0) * scale)) - 1, dy + int(round((region[3] - y0) * scale)) - 1)
        cv2.rectangle(out, p0, p1, BOX_COLOR, max(1, size // 100))
    return out


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    max_side: int = FULL_MAX_SIDE,
    min_side: int = FULL_MIN_SIDE,
) -> np.ndarray:
    """Draw ``boxes`` (k, 4) as (x0, y0, x1, y1), x1/y1 exclusive, with their ``labels`` on an
    RGB image (H, W, 3). The image is first scaled so that its longer side lies within
    ``[min_side, max_side]`` (small images are enlarged so the labels stay readable)."""
    h, w = image.shape[:2]
    s = float(np.clip(1.0, min_side / max(h, w), max_side / max(h, w)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST
    out = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp) if s != 1 else image.copy()
    out = np.ascontiguousarray(out)
    thick = max(1, round(max(out.shape[:2]) / 300))
    scale = max(0.35, max(out.shape[:2]) / 900)
    for (x0, y0, x1, y1), label, col in zip(np.asarray(boxes).reshape(-1, 4), labels, colors):
        p0 = (int(x0 * s), int(y0 * s))
        p1 = (max(int(x0 * s), int(round(x1 * s)) - 1), max(int(y0 * s), int(round(y1 * s)) - 1))
        cv2.rectangle(out, p0, p1, col, thick)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = p0[1] - 2 if p0[1] - th - base - 2 >= 0 else min(out.shape[0] - 1, p1[1] + th + 2)
        cv2.rectangle(out, (p0[0], ty - th - base + 1), (p0[0] + tw + 2, ty + base - 1), col, -1)
        cv2.putText(out, label, (p0[0] + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def full_view(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    mebin_mask: np.ndarray | None,
    true_mask: np.ndarray | None,
    map_u8: np.ndarray | None,
) -> np.ndarray:
    """The full image (H, W, 3) with its crop boxes (:func:`draw_boxes`) and the true mask
    outlined, beside the anomaly map over the image with MEBin's mask outlined; both scaled
    alike. Returns uint8 (h, 2 w + PANEL_GAP, 3)."""
    left = draw_boxes(image, boxes, labels, colors)
    h, w = left.shape[:2]
    thick = max(1, round(max(h, w) / 300))
    left = draw_outline(left, true_mask, TRUE_COLOR, thick)
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    right = map_overlay(small, map_u8) if map_u8 is not None else small
    right = draw_outline(right, mebin_mask, MEBIN_COLOR, thick)
    return np.concatenate([left, np.full((h, PANEL_GAP, 3), 255, np.uint8), right], axis=1)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # titles and labels are plain text: an id may hold "$"
    import matplotlib.pyplot as plt

    return plt


def plot_count_sequence(
    path: str | os.PathLike, thresholds: np.ndarray, counts: np.ndarray, chosen: int, title: str
) -> None:
    """Save a plot of the connected-component count (T,) along the MEBin threshold sweep (T,)
    with the chosen threshold marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 2.4), dpi=100)
    ax.step(thresholds, counts, where="mid", color="#1f77b4", lw=1.5)
    ax.axvline(chosen, color="#d62728", ls="--", lw=1.2, label=f"threshold {chosen}")
    ax.set_xlabel("threshold (0-255)")
    ax.set_ylabel("regions")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.yaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_num_classes(path: str | os.PathLike, metrics: dict) -> None:
    """Save the score of each candidate K (``metrics/num_classes.json``'s ``scores``), the
    estimate starred and the K trained with dashed."""
    plt = _pyplot()
    ks = [int(k[1:]) for k in metrics.get("scores", {})]
    fig, ax = plt.subplots(figsize=(4.8, 2.8), dpi=100)
    ax.plot(ks, list(metrics.get("scores", {}).values()), "o-", color="#1f77b4", lw=1.5, ms=4)
    est = metrics["estimate"]
    if f"k{est}" in metrics.get("scores", {}):
        ax.plot([est], [metrics["scores"][f"k{est}"]], "*", color="#d62728", ms=14, label=f"estimate K = {est}")
    ax.axvline(metrics["num_classes"], color="#2ca02c", ls="--", lw=1.2, label=f"trained with K = {metrics['num_classes']}")
    ax.set_xlabel("K (number of classes)")
    ax.set_ylabel(f"{metrics['method']} score (higher is better)")
    ax.set_xticks(ks)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training_curves(path: str | os.PathLike, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Save the per-epoch training curves ``{name: (epochs (E,), values (E,))}``: the losses
    (:data:`LOSS_CURVES`) on the left, the schedules (:data:`SCHEDULE_CURVES`) on the right."""
    plt = _pyplot()
    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(9.0, 3.0), dpi=100)
    for ax, names, title in ((ax_l, LOSS_CURVES, "losses"), (ax_s, SCHEDULE_CURVES, "schedules")):
        for name in names:
            if name in curves:
                ax.plot(*curves[name], lw=1.4, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    ax_s.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_live_curves(folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """DVCLive's per-metric files ``<folder>/<name>.tsv`` (columns step, name) as
    ``{name: (steps int (E,), values float (E,))}``; a missing folder gives ``{}``."""
    out = {}
    for f in sorted(Path(folder).glob("*.tsv")) if Path(folder).is_dir() else []:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows and f.stem in rows[0]:
            out[f.stem] = (np.array([int(r["step"]) for r in rows]), np.array([float(r[f.stem]) for r in rows]))
    return out


# -- page model --------------------------------------------------------------------------------


@dataclass
class ImageEntry:
    """One image of the run. boxes: (k, 4) its crops' context boxes, regions: (k, 4) their defect
    boxes (:class:`anomalyncd.store.CropSet`; None: not known); crop_rows: indices of its crops in the crop store;
    anomaly: whether MEBin found an anomaly (else its status is "no anomaly found");
    mebin_mask: bool (H, W) MEBin's mask; map_u8: uint8 (S, S) its anomaly map; true_mask:
    the path of the dataset's mask ("" if none)."""

    id: str
    path: str
    cluster: int
    confidence: float
    truth: str
    boxes: np.ndarray
    crop_rows: list[int]
    crop_clusters: list[int]
    crop_weights: list[float]
    anomaly: bool = True
    mebin_mask: np.ndarray | None = None
    map_u8: np.ndarray | None = None
    true_mask: str = ""
    regions: np.ndarray | None = None
    bits: int = 16  # the significant bits of the set's 16-bit images (anomalyncd.io.read_image)

    def main_crop(self) -> int | None:
        """The crop that weighs most in the image's class (None: no crop)."""
        return int(np.argmax(self.crop_weights)) if self.crop_rows else None

    def defect_box(self) -> tuple[int, ...] | None:
        """The defect's box of the main crop (None without anomaly or regions)."""
        j = self.main_crop()
        if not self.anomaly or j is None or self.regions is None:
            return None
        box = tuple(int(v) for v in self.regions[j])
        return box if box[2] > box[0] and box[3] > box[1] else None


@dataclass
class MebinEntry:
    id: str
    thresholds: np.ndarray
    counts: np.ndarray
    chosen: int


@dataclass
class ReportData:
    """Everything the page shows. ``names``: cluster id -> matched true type (may be empty).
    ``metrics``: the evaluate metrics dict; ``detect``, ``mebin_metrics``, ``num_classes``:
    those stages' metrics files ({} when absent); ``curves``: the training curves
    (:func:`read_live_curves`); ``params``: params.yaml's sections. ``confusion``: (classes,
    cluster ids, table) or None. ``matched``: class id -> matched true type, for the thumbnails'
    borders (None: ``names`` are the matched types). ``classes``: the class ids with a section
    (None: ``0..n_clusters-1``). ``catalog``: the resolved catalog, one row per discovered cluster
    (:func:`anomalyncd.catalog.to_attrs`; empty: none shown). An image or crop of class
    :data:`~anomalyncd.catalog.REJECTED_ID` is in a rejected cluster (not a defect)."""

    title: str
    n_clusters: int
    images: list[ImageEntry]
    metrics: dict
    names: dict[int, str] = field(default_factory=dict)
    confusion: tuple[list[str], list[int], np.ndarray] | None = None
    mebin: list[MebinEntry] = field(default_factory=list)
    per_class_images: int = 24
    detect: dict = field(default_factory=dict)
    mebin_metrics: dict = field(default_factory=dict)
    num_classes: dict = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    matched: dict[int, str] | None = None
    classes: list[int] | None = None
    catalog: list[dict] = field(default_factory=list)

    def matched_type(self, k: int) -> str | None:
        return self.names.get(k) if self.matched is None else self.matched.get(k)


def cluster_label(k: int, names: dict[int, str]) -> str:
    """``class 3 (crack)`` or ``class 3``; ``-1`` is ``no anomaly found``, ``-2`` (a rejected
    cluster) ``not a defect``."""
    if k == REJECTED_ID:
        return REJECTED
    if k < 0:
        return NO_ANOMALY_LABEL
    return f"class {k} ({names[k]})" if k in names else f"class {k}"


def write_report(out_dir: str | os.PathLike, data: ReportData) -> None:
    """Write ``index.html`` and its images into ``out_dir`` (replaced atomically)."""
    with atomic_path(out_dir) as tmp:
        for sub in ("img", "full", "mebin", "charts"):
            (tmp / sub).mkdir(parents=True)
        (tmp / "strip").mkdir()
        colors = palette(max(1, data.n_clusters))
        body = [f"<h1>{_e(data.title)}</h1>", _summary(tmp, data, colors), _header(data)]
        body += [_class_section(tmp, data, k, colors) for k in _cluster_order(data)]
        body.append(_rejected_section(tmp, data, colors))
        body.append(_no_anomaly_section(tmp, data, colors))
        research = [_research(tmp, data), _mebin_section(tmp, data), _params_section(data.params)]
        body.append(
            "<h2 id='research'>For research: metrics, charts and parameters</h2><details><summary>Show the "
            "class-discovery, detection and MEBin metrics, the number of classes, the training curves, the per-type "
            "tables, MEBin's threshold sweeps and the parameters of the run</summary>"
            + "\n".join(b for b in research if b) + "</details>"
        )
        (tmp / "index.html").write_text(_page(data.title, "\n".join(b for b in body if b)), encoding="utf-8")


def _cluster_order(data: ReportData) -> list[int]:
    """Defect classes with images first, in id order; then empty ones (the images without
    anomaly have their own section)."""
    sizes = {k: 0 for k in (range(data.n_clusters) if data.classes is None else data.classes)}
    for im in data.images:
        if im.anomaly and im.cluster >= 0:
            sizes[im.cluster] = sizes.get(im.cluster, 0) + 1
    return sorted(sizes, key=lambda k: (sizes[k] == 0, k))


def _fmt(v: object) -> str:
    """A table cell: floats with 3 decimals (NaN and None empty), anything else as text."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else _e(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "num") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr><th>" + _e(r[0]) + "</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in r[1:]) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _legend() -> str:
    return (
        "<div class='legend'><b>Reading the thumbnails.</b> Left: the image's main crop, with "
        "<span class='sw' style='background:rgb%s'></span> MEBin's mask and "
        "<span class='sw' style='background:rgb%s'></span> the true mask (where the dataset has one) outlined, and "
        "<span class='sw' style='background:rgb%s'></span> the defect's box. "
        "Right: the anomaly map over the same crop (blue low, red high). Border: "
        "<span class='sw' style='background:#4c4'></span> the true type is the class's matched type, "
        "<span class='sw' style='background:#e33'></span> it differs, "
        "<span class='sw' style='background:#999'></span> no ground truth. A thumbnail links to the full image "
        "with every defect's box.</div>"
    ) % (MEBIN_COLOR, TRUE_COLOR, BOX_COLOR)


def _warnings(data: ReportData) -> list[str]:
    out = [_e(w) for w in _estimate(data)[1]] if data.num_classes.get("estimate") is not None else []
    none_found = data.metrics.get("no_anomaly", {}).get("images", 0)
    if none_found:
        out.append(
            f"MEBin found no anomaly in {none_found} of {len(data.images)} images: they have no class and count "
            "as wrong in the F1 (<a href='#no-anomaly'>see them</a>)."
        )
    if data.detect and data.detect.get("pretrained") is False and data.detect.get("backbone") not in (None, "filterbank"):
        out.append("The detector's backbone ran with random weights: its maps are much weaker than with pretrained ones.")
    return out


def _estimate(data: ReportData) -> tuple[str, list[str]]:
    return estimate_summary(data.num_classes)


#: the summary suggests reviewing the images classified with less confidence than this
REVIEW_BELOW = 0.8


def _summary(out: Path, data: ReportData, colors: list[tuple[int, int, int]]) -> str:
    """What a plant engineer reads first: the types found and their numbers of images, a strip
    of examples of each (most confident first, cut around the defect), the least certain
    images to review, and what to do next."""
    indexed = list(enumerate(data.images))
    found = [(i, im) for i, im in indexed if im.anomaly and im.cluster >= 0]
    none = [im for im in data.images if not im.anomaly]
    rejected = sum(im.anomaly and im.cluster == REJECTED_ID for im in data.images)
    sizes = {k: sum(im.cluster == k for _, im in found) for k in _cluster_order(data)}
    types = [k for k in _cluster_order(data) if sizes.get(k)]
    conf = {k: [im.confidence for _, im in found if im.cluster == k and np.isfinite(im.confidence)] for k in types}
    parts = [
        "<section id='summary'><h2>Summary</h2>",
        f"<p class='lead'><b>{len(types)} defect types</b> found in {len(data.images)} images"
        + (f"; no anomaly found in <a href='#no-anomaly'>{len(none)} images</a>" if none else "")
        + (f"; <a href='#rejected'>{rejected} images</a> in clusters rejected as not a defect" if rejected else "") + ".</p>",
    ]
    rows = "".join(
        f"<tr><th><span class='sw' style='background:rgb{colors[k % len(colors)]}'></span> "
        f"<a href='#{_anchor(k)}'>{_e(cluster_label(k, data.names))}</a></th><td>{sizes[k]}</td>"
        f"<td>{100 * sizes[k] / max(1, len(data.images)):.0f} %</td><td>{_fmt(float(np.mean(conf[k])) if conf[k] else None)}</td></tr>"
        for k in types
    )
    parts += _estimate_lead(data)
    parts.append(f"<table class='num'><tr><th>type</th><th>images</th><th>share</th><th>mean confidence</th></tr>{rows}</table>")
    parts.append(_catalog(data))
    for k in types:
        members = sorted((p for p in found if p[1].cluster == k), key=lambda p: (-np.nan_to_num(p[1].confidence, nan=-1.0), p[1].id))
        figs = "".join(_strip_figure(out, data, i, im, colors, f"{im.confidence:.2f}") for i, im in members[:STRIP_IMAGES])
        parts.append(f"<h3><a href='#{_anchor(k)}'>{_e(cluster_label(k, data.names))}</a>: {sizes[k]} images</h3>"
                     f"<div class='gallery strip'>{figs}</div>")
    review = sorted((p for p in found if np.isfinite(p[1].confidence)), key=lambda p: (p[1].confidence, p[1].id))[:REVIEW_IMAGES]
    if review:
        figs = "".join(
            _strip_figure(out, data, i, im, colors, f"{cluster_label(im.cluster, data.names)}, {im.confidence:.2f}")
            for i, im in review
        )
        parts.append("<h3 id='review'>Least certain: review these first</h3>"
                     f"<div class='gallery strip'>{figs}</div>")
    parts.append("<h3>What to do next</h3><ul class='next'>" + "".join(f"<li>{t}</li>" for t in _next_steps(data, found, none)) + "</ul>")
    return "\n".join(parts) + "</section>"


def _catalog(data: ReportData) -> str:
    """The catalog: each curated class with the clusters it holds, and the rejected clusters."""
    if not data.catalog:
        return ""
    classes: dict[int, list[dict]] = {}
    for row in data.catalog:
        classes.setdefault(REJECTED_ID if row["rejected"] else row["class"], []).append(row)
    sizes = {int(k): v.get("size", 0) for k, v in data.metrics.get("clusters", {}).items()}
    rows = []
    for k in sorted(classes, key=lambda c: (c == REJECTED_ID, c)):
        members = classes[k]
        ids = ", ".join(str(r["cluster"]) for r in members)
        how = "rejected: not a defect" if k == REJECTED_ID else ("merged" if len(members) > 1 else "")
        matched = ", ".join(sorted({r["matched"] for r in members if r.get("matched")}))
        name = f"<a href='#{_anchor(k)}'>{_e(members[0]['name'])}</a>"
        rows.append(
            f"<tr><th>{name}</th><td>{_e(ids)}</td><td>{sum(sizes.get(r['cluster'], 0) for r in members)}</td>"
            f"<td>{_e(matched)}</td><td>{_e(how)}</td></tr>"
        )
    return (
        "<h3 id='catalog'>Catalog</h3><p>How <code>classes.yaml</code> curates the discovered clusters "
        "(<code>anomalyncd classes show</code>; edit with <code>anomalyncd classes name|merge|reject</code>, then "
        "<code>dvc repro</code>).</p><table class='num catalog'><tr><th>class</th><th>clusters</th><th>images</th>"
        f"<th>matched true type</th><th></th></tr>{''.join(rows)}</table>"
    )


def _estimate_lead(data: ReportData) -> list[str]:
    """With ``num_classes: auto``: the number of types as estimated, its runner-up and
    confidence, and the estimate's warnings, under the summary's first line."""
    nc = data.num_classes
    if not nc.get("auto") or nc.get("estimate") is None:
        return []
    odds = [f"runner-up {nc['runner_up']}"] if nc.get("runner_up") is not None else []
    odds += [f"confidence {nc['confidence']:.2f}"] if nc.get("confidence") is not None else []
    lead = f"<p>The number of types was estimated from the images: {nc['estimate']}" + (f" ({', '.join(odds)})" if odds else "") + ".</p>"
    warns = _estimate(data)[1]
    return [lead] + (["<ul class='warn estimate'>" + "".join(f"<li>{_e(w)}</li>" for w in warns) + "</ul>"] if warns else [])


def _next_steps(data: ReportData, found: list[tuple[int, ImageEntry]], none: list[ImageEntry]) -> list[str]:
    """The summary's advice, from what the run found."""
    steps = []
    unsure = sum(np.isfinite(im.confidence) and im.confidence < REVIEW_BELOW for _, im in found)
    if unsure:
        steps.append(
            f"Check the {unsure} images classified with confidence below {REVIEW_BELOW} (the least certain are shown "
            "above). If some belong to a type of their own, run with one type more: "
            f"<code>dvc exp run -S train.num_classes={data.n_clusters + 1}</code>."
        )
    if none:
        steps.append(
            f"Look at the <a href='#no-anomaly'>{len(none)} images with no anomaly found</a>: a defect there was missed "
            "by the detector (or the image is good)."
        )
    nc = data.num_classes
    if nc.get("estimate") is not None and nc["estimate"] != nc.get("num_classes"):
        steps.append(
            f"The images suggest {nc['estimate']} types, this run sorted them into {nc.get('num_classes')}: compare with "
            f"<code>dvc exp run -S train.num_classes={nc['estimate']}</code>, then <code>anomalyncd exps</code>."
        )
    if not data.names:
        steps.append(
            "Name each type from its examples above (<code>anomalyncd classes name &lt;cluster&gt; &lt;name&gt;</code>, "
            "then <code>dvc repro</code>); the type numbers stay the same for new images of this run."
        )
    if data.catalog:
        steps.append(
            "Curate the types in <a href='#catalog'>the catalog</a>: <code>anomalyncd classes name|merge|reject "
            "&lt;cluster&gt; ...</code> names a type, merges two clusters of one type or rejects false alarms, and "
            "<code>dvc repro</code> applies it (merge, calibrate and evaluate only); <code>anomalyncd export --out labelled</code> "
            "then writes the curated crops as a labelled data set."
        )
    steps.append(
        "Classify new images with this run: <code>anomalyncd predict --run . &lt;folder&gt; --out new.csv</code> "
        "(one row per image: its type, the confidence and the defect's box)."
    )
    return steps


def _strip_figure(out: Path, data: ReportData, idx: int, im: ImageEntry, colors: list[tuple[int, int, int]], caption: str) -> str:
    """A summary example: the image cut around its defect (:func:`defect_thumbnail`), linked
    to its full view."""
    rel = f"strip/{idx:05d}.png"
    rgb = read_image(im.path, im.bits)
    if not (out / rel).exists():
        write_image(out / rel, defect_thumbnail(rgb, im.defect_box()))
    full = _full_image(out, data, idx, im, colors, rgb, read_mask(im.true_mask) if im.true_mask else None)
    return (
        f"<figure class='ex'><a href='{full}'><img src='{rel}' width='{STRIP_SIZE}' height='{STRIP_SIZE}' alt='{_e(im.id)}'></a>"
        f"<figcaption>{_breakable(im.id)}<br>{_e(caption)}</figcaption></figure>"
    )


def _header(data: ReportData) -> str:
    """What the thumbnails show and the warnings, above the galleries."""
    m = data.metrics
    parts = [_legend()]
    warns = _warnings(data)
    if not m.get("ground_truth"):
        warns.insert(0, "No ground truth was available: the classes below are unnamed clusters.")
    if warns:
        parts.append("<ul class='warn'>" + "".join(f"<li>{w}</li>" for w in warns) + "</ul>")
    return "\n".join(parts)


def _research(out: Path, data: ReportData) -> str:
    """The metrics, charts and tables for research (folded on the page)."""
    m = data.metrics
    n_crops = sum(len(im.crop_rows) for im in data.images)
    none_found = sum(not im.anomaly for im in data.images)
    parts = [
        f"<p>{len(data.images)} images, {n_crops} crops, {data.n_clusters} discovered classes; "
        f"{none_found} images with no anomaly found.</p>",
        "<h2>Results</h2>",
    ]
    if m.get("ground_truth"):
        rows = [[lvl, m[lvl]["n"], m[lvl]["nmi"], m[lvl]["ari"], m[lvl]["f1"]] for lvl in ("image", "crop") if lvl in m]
        base = m.get("baseline", {})
        seeds = f", mean of {base['kmeans_seeds']} seeds" if "kmeans_seeds" in base else ""
        rows += [[f"{lvl}: k-means on the frozen features{seeds}", b["n"], b["nmi"], b["ari"], b["f1"]] for lvl, b in base.items() if lvl in ("image", "crop")]
        parts.append("<h3>Class discovery</h3>" + _table(["level", "n", "NMI", "ARI", "F1"], rows))
    if data.detect:
        keys = [("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro")]
        shown = [(name, data.detect[k]) for name, k in keys if k in data.detect]
        desc = f"{data.detect.get('method', '?')}, backbone {data.detect.get('backbone', '?')}, weights: {data.detect.get('weights', '?')}"
        parts.append(f"<h3>Detection ({_e(desc)})</h3>" + (_table(["metric", "value"], shown) if shown else "<p>No ground truth to score the maps.</p>"))
    if data.mebin_metrics:
        mm = data.mebin_metrics
        rows = [
            ["erosion", mm.get("erosion")],
            ["images with no anomaly found", mm.get("images_without_anomaly")],
            ["crops per image", mm.get("crops_per_image")],
            ["true regions found (at least half inside the crops)", mm.get("gt_regions_found")],
            ["true regions whole inside one crop", mm.get("gt_regions_whole_in_a_crop")],
            ["true defect pixels inside the crops", mm.get("gt_pixels_in_crops")],
            ["MEBin's mask: mean region IoU with the true defects", mm.get("gt_mask_iou")],
        ]
        parts.append("<h3>MEBin</h3>" + _table(["", "value"], [r for r in rows if r[1] is not None]))
    if data.num_classes.get("estimate") is not None:
        plot_num_classes(out / "charts" / "num_classes.png", data.num_classes)
        parts.append(
            f"<h2>Number of classes</h2><p>{_e(_estimate(data)[0])}</p>"
            "<img src='charts/num_classes.png' alt='score of each candidate number of classes'>"
        )
    if data.curves:
        plot_training_curves(out / "charts" / "training.png", data.curves)
        parts.append("<h2>Training</h2><img src='charts/training.png' alt='training curves'>")
    if m.get("ground_truth"):
        parts.append(_truth_tables(data))
    clusters = m.get("clusters", {})
    if clusters:
        cat = {r["cluster"]: r for r in data.catalog}

        def label(k: int) -> str:
            r = cat.get(k)
            if r is None:
                return f"<a href='#{_anchor(k)}'>{_e(cluster_label(k, data.names))}</a>"
            to = REJECTED_ID if r["rejected"] else r["class"]
            return f"cluster {k}: <a href='#{_anchor(to)}'>{_e(r['name'])}</a>"

        rows = "".join(
            f"<tr><th>{label(int(k))}</th><td>{v['size']}</td><td>{_fmt(v['mean_confidence'])}</td></tr>"
            for k, v in clusters.items()
        )
        parts.append(
            "<h2>Discovered classes</h2><table class='num'><tr><th>class</th><th>images</th><th>mean confidence "
            f"(images with an anomaly)</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def _truth_tables(data: ReportData) -> str:
    m, parts = data.metrics, []
    if m.get("per_category"):
        rows = [[c] + [v["image"][k] for k in ("nmi", "ari", "f1")] for c, v in m["per_category"].items()]
        mean = m.get("mean", {}).get("image", {})
        if mean:
            rows.append(["mean"] + [mean[k] for k in ("nmi", "ari", "f1")])
        parts.append("<h3>Per category (image level)</h3>" + _table(["category", "NMI", "ARI", "F1"], rows))
    if m.get("per_class"):
        rows = [
            [name, v["cluster"], v["support"], v["precision"], v["recall"]]
            for name, v in m["per_class"].items()
        ]
        parts.append(
            "<h3>Per true type after matching (image level)</h3>"
            + _table(["true type", "matched class", "images", "precision", "recall"], rows)
        )
    if data.confusion is not None:
        parts.append(_confusion_table(*data.confusion, data.names))
    return "\n".join(parts)


def _confusion_table(classes: list[str], clusters: list[int], table: np.ndarray, names: dict[int, str]) -> str:
    head = "".join(f"<th>{_e(cluster_label(k, names))}</th>" for k in clusters)
    rows = []
    for name, row in zip(classes, table):
        tot = max(1, int(row.sum()))
        cells = "".join(
            f"<td style='background: rgba(31,119,180,{0.85 * v / tot:.2f})'>{int(v)}</td>" for v in row
        )
        rows.append(f"<tr><th>{_e(name)}</th>{cells}</tr>")
    return (
        "<h3>Confusion matrix (image level; rows: true type, columns: discovered class)</h3>"
        f"<table class='num confusion'><tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def _anchor(k: int) -> str:
    return "rejected" if k == REJECTED_ID else "no-anomaly" if k < 0 else f"class-{k}"


def _class_section(out: Path, data: ReportData, k: int, colors: list[tuple[int, int, int]]) -> str:
    members = [(i, im) for i, im in enumerate(data.images) if im.cluster == k and im.anomaly]
    members.sort(key=lambda p: (-np.nan_to_num(p[1].confidence, nan=-1.0), p[1].id))
    label = cluster_label(k, data.names)
    matched = data.matched_type(k)
    title = f"<h2 id='{_anchor(k)}'>{_e(label)}: {len(members)} images</h2>"
    if not members:
        return title + "<p>No image was assigned to this class.</p>"
    info = f"<p>Matched true type: <b>{_e(matched)}</b></p>" if matched else ""
    merged = [r["cluster"] for r in data.catalog if r["class"] == k and not r["rejected"]]
    if len(merged) > 1:
        info += f"<p>Discovered clusters {_e(', '.join(map(str, merged)))}, merged by the catalog.</p>"
    figs = []
    for idx, im in members[: data.per_class_images]:
        border = "" if not (matched and im.truth) else (" wrong" if im.truth != matched else " right")
        conf = "" if not np.isfinite(im.confidence) else f" {im.confidence:.2f}"
        figs.append(_figure(out, data, idx, im, colors, im.main_crop(), border, conf))
    more = f"<p>{len(members) - data.per_class_images} more not shown.</p>" if len(members) > data.per_class_images else ""
    return title + info + "<div class='gallery'>" + "".join(figs) + "</div>" + more


def _rejected_section(out: Path, data: ReportData, colors: list[tuple[int, int, int]]) -> str:
    members = [(i, im) for i, im in enumerate(data.images) if im.anomaly and im.cluster == REJECTED_ID]
    if not members:
        return ""
    members.sort(key=lambda p: p[1].id)
    figs = [_figure(out, data, idx, im, colors, im.main_crop(), "", "") for idx, im in members[: data.per_class_images]]
    more = f"<p>{len(members) - data.per_class_images} more not shown.</p>" if len(members) > data.per_class_images else ""
    clusters = ", ".join(str(r["cluster"]) for r in data.catalog if r["rejected"])
    return (
        f"<h2 id='rejected'>{REJECTED}: {len(members)} images</h2>"
        f"<p>The catalog rejects cluster(s) {_e(clusters)} as not a defect (false alarms): their images are named "
        f"<code>{REJECTED}</code> in <code>data/merge/predictions.csv</code> and by <code>anomalyncd predict</code>.</p>"
        "<div class='gallery'>" + "".join(figs) + "</div>" + more
    )


def _no_anomaly_section(out: Path, data: ReportData, colors: list[tuple[int, int, int]]) -> str:
    members = [(i, im) for i, im in enumerate(data.images) if not im.anomaly]
    if not members:
        return ""
    members.sort(key=lambda p: p[1].id)
    figs = [_figure(out, data, idx, im, colors, None, "", "") for idx, im in members[: data.per_class_images]]
    more = f"<p>{len(members) - data.per_class_images} more not shown.</p>" if len(members) > data.per_class_images else ""
    return (
        f"<h2 id='no-anomaly'>{NO_ANOMALY_LABEL}: {len(members)} images</h2>"
        "<p>MEBin found no stable anomaly region in these images, so they have no class (status "
        "<code>no anomaly found</code> in <code>data/merge/predictions.csv</code>) and count as wrong in the F1. "
        "Shown whole: the image, and the anomaly map over it. A true mask without a matching hot spot means the "
        "detector missed the defect; a hot spot MEBin did not keep means its threshold search (mebin params) did.</p>"
        "<div class='gallery'>" + "".join(figs) + "</div>" + more
    )


def _figure(
    out: Path, data: ReportData, idx: int, im: ImageEntry, colors: list[tuple[int, int, int]], crop: int | None, border: str, conf: str
) -> str:
    """One gallery entry: the panels of crop number ``crop`` of the image (the whole image when
    None), linked to its full view."""
    rgb = read_image(im.path, im.bits)
    true_mask = read_mask(im.true_mask) if im.true_mask else None
    box = im.boxes[crop] if crop is not None else (0, 0, rgb.shape[1], rgb.shape[0])
    rel = f"img/{idx:05d}.png"
    write_image(out / rel, region_panels(rgb, box, im.mebin_mask, true_mask, im.map_u8, defect=im.defect_box() if crop is not None else None))
    full = _full_image(out, data, idx, im, colors, rgb, true_mask)
    truth = f"<br>true: {_e(im.truth)}" if im.truth else ""
    width = 2 * THUMB_SIZE + PANEL_GAP
    return (
        f"<figure class='thumb{border}'><a href='{full}'><img src='{rel}' width='{width}' height='{THUMB_SIZE}' "
        f"alt='{_e(im.id)}'></a><figcaption>{_breakable(im.id)}{conf}{truth}</figcaption></figure>"
    )


def _full_image(
    out: Path, data: ReportData, idx: int, im: ImageEntry, colors: list[tuple[int, int, int]], rgb: np.ndarray, true_mask
) -> str:
    rel = f"full/{idx:05d}.jpg"
    if (out / rel).exists():
        return rel
    labels = [cluster_label(c, data.names) if c < 0 else (f"{c}: {data.names[c]}" if c in data.names else str(c)) for c in im.crop_clusters]
    cols = [colors[c % len(colors)] if c >= 0 else (128, 128, 128) for c in im.crop_clusters]
    drawn = full_view(rgb, _shown_boxes(im), labels, cols, im.mebin_mask, true_mask, im.map_u8)
    cv2.imwrite(str(out / rel), np.ascontiguousarray(drawn[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return rel


def _shown_boxes(im: ImageEntry) -> np.ndarray:
    """The boxes the full view draws: each crop's defect box, its context crop where it has none."""
    boxes = np.asarray(im.boxes).reshape(-1, 4).copy()
    if im.regions is not None:
        regions = np.asarray(im.regions).reshape(-1, 4)
        has = (regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])
        boxes[has] = regions[has]
    return boxes


def _mebin_section(out: Path, data: ReportData) -> str:
    if not data.mebin:
        return ""
    figs = []
    for i, e in enumerate(data.mebin):
        rel = f"mebin/{i:03d}.png"
        plot_count_sequence(out / rel, e.thresholds, e.counts, e.chosen, e.id)
        figs.append(f"<figure><img src='{rel}' alt='MEBin count sequence of {_e(e.id)}'></figure>")
    return (
        "<h2>MEBin: region count along the threshold sweep</h2>"
        "<p>Number of connected anomaly regions at each threshold of the MEBin sweep; the dashed line "
        "is the threshold MEBin chose, at the end of the longest stable run of equal, non-zero counts "
        "(255: no anomaly region found).</p>"
        "<div class='gallery'>" + "".join(figs) + "</div>"
    )


def _params_section(params: dict) -> str:
    if not params:
        return ""
    tables = "".join(
        f"<h3>{_e(section)}</h3>" + _table(["param", "value"], [[k, str(v)] for k, v in values.items()], cls="params")
        for section, values in params.items()
        if isinstance(values, dict)
    )
    return f"<h2 id='params'>Parameters of the run</h2><details><summary>params.yaml</summary>{tables}</details>"


def _breakable(s: str) -> str:
    """Escaped ``s`` that may wrap after ``/``, ``_`` or ``-`` but never inside a name or number."""
    return "<wbr>".join(_e(p) for p in re.split(r"(?<=[/_-])", s))


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
table.num td { text-align: right; }
table.params td { text-align: left; font-family: monospace; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; font-size: 11px; }
figure.thumb { width: 330px; }
figure.ex { width: 206px; }
figure.ex img { border: 1px solid #999; }
.lead { font-size: 1.2em; }
#summary h3 { margin: 0.8em 0 0.3em; }
ul.next li { margin: 0.3em 0; }
details > summary { cursor: pointer; color: #1f4e99; }
figure.thumb figcaption { overflow-wrap: break-word; word-break: normal; }
figure.thumb img { border: 3px solid #999; }
figure.thumb.right img { border-color: #4c4; }
figure.thumb.wrong img { border-color: #e33; }
.legend { background: #f4f6f8; padding: 0.5em 0.8em; font-size: 13px; border-left: 4px solid #1f77b4; }
.sw { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; border: 1px solid #666; }
.warn { background: #fff3cd; padding: 0.5em 0.5em 0.5em 2em; }
h2 { border-bottom: 1px solid #ddd; margin-top: 1.5em; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )
