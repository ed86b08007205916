"""The static HTML report of a run: ``reports/index.html`` plus image files beside it.

Top of the page: the metrics and the image-level confusion matrix (when ground truth exists)
or the cluster sizes. Then one section per discovered class with its size, its matched true
type and a gallery of crop thumbnails (mask outline drawn); each thumbnail links to the full
image with every crop's box, coloured by the crop's class. Last, the MEBin component-count
sequence and chosen threshold of a few images. The page has no scripts and no external
resources, so it opens offline; images are separate files so the page stays small.

Drawing helpers are pure (arrays in, arrays out); :func:`write_report` does the file I/O.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .io import atomic_path, read_image, write_image

THUMB_SIZE = 128
FULL_MAX_SIDE = 768
FULL_MIN_SIDE = 384


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


def outline_thumbnail(
    crop: np.ndarray, mask: np.ndarray, size: int = THUMB_SIZE, color: tuple[int, int, int] = (255, 215, 0)
) -> np.ndarray:
    """Resize an RGB crop (C, C, 3) to (size, size, 3) and draw its mask's (C, C) outline."""
    thumb = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_LINEAR)
    m = cv2.resize(np.asarray(mask, dtype=np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(thumb, contours, -1, color, thickness=max(1, size // 96), lineType=cv2.LINE_AA)
    return thumb


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


def plot_count_sequence(
    path: str | os.PathLike, thresholds: np.ndarray, counts: np.ndarray, chosen: int, title: str
) -> None:
    """Save a plot of the connected-component count (T,) along the MEBin threshold sweep (T,)
    with the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# -- page model --------------------------------------------------------------------------------


@dataclass
class ImageEntry:
    """One classified image. boxes: (k, 4); crop_rows: indices of its crops in the CropSet."""

    id: str
    path: str
    cluster: int
    confidence: float
    truth: str
    boxes: np.ndarray
    crop_rows: list[int]
    crop_clusters: list[int]
    crop_weights: list[float]


@dataclass
class MebinEntry:
    id: str
    thresholds: np.ndarray
    counts: np.ndarray
    chosen: int


@dataclass
class ReportData:
    """Everything the page shows. ``names``: cluster id -> matched true type (may be empty).
    ``metrics``: the evaluate metrics dict. ``confusion``: (classes, cluster ids, table) or None.
    ``crops`` / ``crop_masks``: the CropSet arrays the thumbnails come from."""

    title: str
    n_clusters: int
    images: list[ImageEntry]
    crops: np.ndarray
    crop_masks: np.ndarray
    metrics: dict
    names: dict[int, str] = field(default_factory=dict)
    confusion: tuple[list[str], list[int], np.ndarray] | None = None
    mebin: list[MebinEntry] = field(default_factory=list)
    per_class_images: int = 24


def cluster_label(k: int, names: dict[int, str]) -> str:
    """``class 3 (crack)`` or ``class 3``; ``-1`` is ``no crop``."""
    if k < 0:
        return "no crop"
    return f"class {k} ({names[k]})" if k in names else f"class {k}"


def write_report(out_dir: str | os.PathLike, data: ReportData) -> None:
    """Write ``index.html`` and its images into ``out_dir`` (replaced atomically)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "img").mkdir()
        (tmp / "full").mkdir()
        (tmp / "mebin").mkdir()
        colors = palette(max(1, data.n_clusters))
        body = [_header(data)]
        for k in _cluster_order(data):
            body.append(_class_section(tmp, data, k, colors))
        body.append(_mebin_section(tmp, data))
        (tmp / "index.html").write_text(_page(data.title, "\n".join(body)), encoding="utf-8")


def _cluster_order(data: ReportData) -> list[int]:
    sizes = {k: 0 for k in range(data.n_clusters)}
    for im in data.images:
        sizes[im.cluster] = sizes.get(im.cluster, 0) + 1
    # classes with images first, in id order; then "no crop" (-1); empty classes last
    return sorted(sizes, key=lambda k: (sizes[k] == 0, k < 0, k))


def _header(data: ReportData) -> str:
    m = data.metrics
    parts = [f"<h1>{_e(data.title)}</h1>"]
    n_crops = sum(len(im.crop_rows) for im in data.images)
    parts.append(f"<p>{len(data.images)} images, {n_crops} crops, {data.n_clusters} discovered classes.</p>")
    if m.get("ground_truth"):
        rows = "".join(
            f"<tr><th>{lvl}</th><td>{m[lvl]['n']}</td>" + "".join(f"<td>{m[lvl][k]:.3f}</td>" for k in ("nmi", "ari", "f1")) + "</tr>"
            for lvl in ("image", "crop")
            if lvl in m
        )
        parts.append(
            "<h2>Metrics</h2><table class='num'><tr><th>level</th><th>n</th><th>NMI</th><th>ARI</th><th>F1</th></tr>"
            f"{rows}</table>"
        )
        if m.get("per_category"):
            cat_rows = "".join(
                f"<tr><th>{_e(c)}</th>" + "".join(f"<td>{v['image'][k]:.3f}</td>" for k in ("nmi", "ari", "f1")) + "</tr>"
                for c, v in m["per_category"].items()
            )
            mean = m.get("mean", {}).get("image", {})
            if mean:
                cat_rows += "<tr class='mean'><th>mean</th>" + "".join(f"<td>{mean[k]:.3f}</td>" for k in ("nmi", "ari", "f1")) + "</tr>"
            parts.append(
                "<h3>Per category (image level)</h3><table class='num'><tr><th>category</th><th>NMI</th><th>ARI</th><th>F1</th></tr>"
                f"{cat_rows}</table>"
            )
        if m.get("per_class"):
            pc = "".join(
                f"<tr><th>{_e(name)}</th><td>{'' if v['cluster'] is None else v['cluster']}</td><td>{v['support']}</td>"
                f"<td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td></tr>"
                for name, v in m["per_class"].items()
            )
            parts.append(
                "<h3>Per true type after matching (image level)</h3><table class='num'><tr><th>true type</th>"
                f"<th>matched class</th><th>images</th><th>precision</th><th>recall</th></tr>{pc}</table>"
            )
        if data.confusion is not None:
            parts.append(_confusion_table(*data.confusion, data.names))
    else:
        parts.append("<p class='warn'>No ground truth was available: the classes below are unnamed clusters.</p>")
    clusters = m.get("clusters", {})
    if clusters:
        rows = "".join(
            f"<tr><th><a href='#class-{k}'>{_e(cluster_label(int(k), data.names))}</a></th><td>{v['size']}</td>"
            f"<td>{'' if v['mean_confidence'] is None else format(v['mean_confidence'], '.3f')}</td></tr>"
            for k, v in clusters.items()
        )
        parts.append(
            "<h2>Discovered classes</h2><table class='num'><tr><th>class</th><th>images</th><th>mean confidence</th></tr>"
            f"{rows}</table>"
        )
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


def _class_section(out: Path, data: ReportData, k: int, colors: list[tuple[int, int, int]]) -> str:
    members = [(i, im) for i, im in enumerate(data.images) if im.cluster == k]
    members.sort(key=lambda p: (-np.nan_to_num(p[1].confidence, nan=-1.0), p[1].id))
    label = cluster_label(k, data.names)
    matched = data.names.get(k)
    title = f"<h2 id='class-{k}'>{_e(label)}: {len(members)} images</h2>"
    if not members:
        return title + "<p>No image was assigned to this class.</p>"
    info = f"<p>Matched true type: <b>{_e(matched)}</b></p>" if matched else ""
    figs = []
    for idx, im in members[: data.per_class_images]:
        full = _full_image(out, data, idx, im, colors)
        truth = f"<br>true: {_e(im.truth)}" if im.truth else ""
        wrong = " wrong" if matched and im.truth and im.truth != matched else ""
        conf = "" if not np.isfinite(im.confidence) else f" {im.confidence:.2f}"
        if im.crop_rows:
            j = im.crop_rows[int(np.argmax(im.crop_weights))]
            thumb = f"img/crop-{j:06d}.png"
            write_image(out / thumb, outline_thumbnail(data.crops[j], data.crop_masks[j]))
            img = f"<img src='{thumb}' width='{THUMB_SIZE}' height='{THUMB_SIZE}' alt='{_e(im.id)}'>"
        else:
            img = "<div class='nocrop'>no crop</div>"
        figs.append(
            f"<figure class='thumb{wrong}'><a href='{full}'>{img}</a>"
            f"<figcaption>{_e(im.id)}{conf}{truth}</figcaption></figure>"
        )
    more = f"<p>{len(members) - data.per_class_images} more not shown.</p>" if len(members) > data.per_class_images else ""
    return title + info + "<div class='gallery'>" + "".join(figs) + "</div>" + more


def _full_image(out: Path, data: ReportData, idx: int, im: ImageEntry, colors: list[tuple[int, int, int]]) -> str:
    rel = f"full/{idx:05d}.jpg"
    rgb = read_image(im.path)
    labels = [f"{c}: {data.names[c]}" if c in data.names else str(c) for c in im.crop_clusters]
    cols = [colors[c % len(colors)] if c >= 0 else (128, 128, 128) for c in im.crop_clusters]
    drawn = draw_boxes(rgb, im.boxes, labels, cols)
    cv2.imwrite(str(out / rel), np.ascontiguousarray(drawn[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return rel


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


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
table.num td { text-align: right; }
tr.mean { font-weight: bold; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; font-size: 11px; word-break: break-all; }
figure.thumb { width: 140px; }
figure.thumb img { border: 3px solid #4c4; }
figure.thumb.wrong img { border-color: #e33; }
.nocrop { width: 128px; height: 128px; background: #eee; display: flex; align-items: center; justify-content: center; }
.warn { background: #fff3cd; padding: 0.5em; }
h2 { border-bottom: 1px solid #ddd; margin-top: 1.5em; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
        "<p style='color:#888;font-size:11px'>Thumbnail border: green = true type equals the class's matched "
        "type, red = it differs; yellow line: the anomaly mask's outline. Click a thumbnail for the full image with every crop's box.</p>"
        "</body></html>\n"
    )
