"""The browsable page of ``anomalyncd predict --report DIR``: what a run made of new images.

``DIR/index.html`` with its images beside it: a summary (images per decision and per class,
the thresholds used), then the images of an **unknown type** first, the new failure modes an
engineer must look at, most unusual first, each with its nearest known class; then per class
the images of known types (least confident first), the images rejected as not a defect, those
judged normal (highest image score first: the closest calls) and those where MEBin found no
anomaly. Each thumbnail is cut around the defect's box and links to the full image with every
box labelled. The page has no scripts and no external resources, like the run's report.

The rows are :func:`anomalyncd.predict.predict_images`'s (the columns of ``predictions.csv``);
drawing uses :mod:`anomalyncd.report`'s helpers.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .calibrate import UNKNOWN, Calibration
from .catalog import REJECTED
from .io import InputError, atomic_path, read_image, write_image
from .merge import NORMAL, STATUS, row_label
from .report import STRIP_SIZE, _e, _breakable, _page, _table, defect_thumbnail, draw_boxes, fit_square, palette

#: thumbnails per gallery (the CSV has every image)
PER_GALLERY = 48
#: what a page folder holds: a folder holding anything else is never replaced
PAGE_FILES = {"index.html", "img", "full"}


def check_report_folder(path: str | os.PathLike, option: str = "--report") -> Path:
    """``path`` if a page may be written there: a new folder, or one holding only a previous
    page (which is replaced). Anything else (a file, a folder with other files, such as the
    project or the CSV's folder) is an ``InputError`` before any work, so nothing is lost."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise InputError(f"{option} {path}: is a file; name a folder for the page")
        other = sorted(p.name for p in path.iterdir() if p.name not in PAGE_FILES)
        if other:
            raise InputError(f"{option} {path}: holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}), "
                             "which writing the page would replace; name a new folder")
    return path


def parse_boxes(text: str) -> list[tuple[int, int, int, int] | None]:
    """A row's ``boxes`` / ``crop_boxes`` cell (``x0 y0 x1 y1`` per crop joined by ``;``, empty
    for a crop without a box) as a list of boxes (None for an empty one)."""
    if not text:
        return []
    return [tuple(int(v) for v in part.split()) if part.strip() else None for part in text.split(";")]  # type: ignore[misc]


def parse_clusters(text: str) -> list[int]:
    """A row's ``crop_clusters`` cell (cluster ids joined by ``;``) as a list of ints."""
    return [int(c) for c in str(text or "").split(";") if c.strip()]


def gallery_order(rows: Sequence[dict]) -> list[tuple[str, str, list[dict]]]:
    """The page's galleries: (title, explanation, rows) for the unknown-type images (highest
    unknown score first), each known class (least confident first), the rejected clusters'
    images, the normal ones (highest image score first) and those without anomaly; empty
    galleries are left out."""
    def num(row: dict, col: str) -> float:
        return float(row[col]) if row.get(col) not in ("", None) else float("nan")

    found = [r for r in rows if r["status"] == STATUS[True]]
    unknown = sorted((r for r in found if r.get("open_set") == UNKNOWN), key=lambda r: -num(r, "unknown_score"))
    known = [r for r in found if r.get("open_set") != UNKNOWN and r.get("name") != REJECTED]
    out = [("Unknown type", "Defects that fit none of the run's classes: a new failure mode, or a known one "
            "that looks different. Most unusual first; the caption names the nearest class.", unknown)]
    for name in sorted({row_label(r) for r in known}):
        members = sorted((r for r in known if row_label(r) == name), key=lambda r: num(r, "confidence"))
        out.append((name, "Least confident first.", members))
    out.append((REJECTED, "Images of the clusters the catalog rejects (false alarms).", [r for r in found if r.get("name") == REJECTED]))
    out.append(("Normal", "The detector's image score is not above the normal threshold. Highest score (the "
                "closest calls) first.", sorted((r for r in rows if r["status"] == NORMAL), key=lambda r: -num(r, "image_score"))))
    out.append((STATUS[False], "Above the normal threshold, but MEBin found no anomaly region.",
                [r for r in rows if r["status"] == STATUS[False]]))
    return [g for g in out if g[2]]


def summary_rows(rows: Sequence[dict]) -> list[list[object]]:
    """[label, images] per decision: the known classes, unknown type, and the statuses."""
    found = [r for r in rows if r["status"] == STATUS[True]]
    per_class = Counter(row_label(r) for r in found if r.get("open_set") != UNKNOWN)
    out: list[list[object]] = [[f"{name} (known type)" if name != REJECTED else name, n] for name, n in sorted(per_class.items())]
    n_unknown = sum(r.get("open_set") == UNKNOWN for r in found)
    if n_unknown:
        out.append(["unknown type", n_unknown])
    statuses = Counter(r["status"] for r in rows if r["status"] != STATUS[True])
    out += [[s, n] for s, n in sorted(statuses.items())]
    return out + [["all images", len(rows)]]


def caption(row: dict, cal: Calibration | None) -> str:
    """The facts under a thumbnail: the decision and the scores it was made on (against the
    thresholds of ``cal``, the calibration predict applied; None: no thresholds)."""
    t_normal = None if cal is None else cal.normal_threshold
    t_unknown = None if cal is None else cal.unknown_threshold
    parts = []
    if row["status"] == STATUS[True]:
        nearest = row_label(row)
        if row.get("open_set") == UNKNOWN:
            parts.append(f"nearest class: {nearest}")
        else:
            parts.append(f"{nearest}, confidence {float(row['confidence']):.2f}" if row.get("confidence") else nearest)
        if row.get("unknown_score"):
            limit = f" (limit {t_unknown:.3g})" if t_unknown is not None else ""
            parts.append(f"unknown score {float(row['unknown_score']):.3g}{limit}")
    if row.get("image_score"):
        limit = f" (limit {t_normal:.3g})" if t_normal is not None else ""
        parts.append(f"image score {float(row['image_score']):.3g}{limit}")
    return "; ".join(parts)


def write_predict_report(out_dir: str | os.PathLike, rows: Sequence[dict], cal: Calibration | None,
                         run: str = "", failed: Sequence[str] = (), bits: int = 16) -> None:
    """Write ``out_dir/index.html`` and its thumbnails (the folder replaced atomically); ``cal``:
    the calibration predict applied (:attr:`anomalyncd.predict.Predictions.calibration`);
    ``bits``: the run's (:attr:`anomalyncd.predict.Run.bits`), as predict read the images."""
    colors = palette(1 + max((c for r in rows for c in parse_clusters(r.get("crop_clusters"))), default=0))
    with atomic_path(out_dir) as tmp:
        (tmp / "img").mkdir(parents=True)
        (tmp / "full").mkdir()
        body = [f"<h1>Predictions{' with ' + _e(run) if run else ''}</h1>", _summary(rows, cal, failed)]
        n = 0
        for title, text, members in gallery_order(rows):
            figs = []
            for row in members[:PER_GALLERY]:
                figs.append(_thumb(tmp, n, row, cal, colors, bits))
                n += 1
            more = (f"<p>{len(members) - PER_GALLERY} more in the CSV.</p>" if len(members) > PER_GALLERY else "")
            anchor = " id='unknown'" if title == "Unknown type" else ""
            body.append(f"<h2{anchor}>{_e(title)} ({len(members)})</h2><p>{_e(text)}</p>"
                        f"<div class='gallery'>{''.join(figs)}</div>{more}")
        (tmp / "index.html").write_text(_page("Predictions", "\n".join(body)), encoding="utf-8")


def _summary(rows: Sequence[dict], cal: Calibration | None, failed: Sequence[str]) -> str:
    lines = []
    if cal is not None and cal.normal_threshold is not None:
        lines.append(f"An image is a defect when its image score is above {cal.normal_threshold:.4g} (quantile "
                     f"{cal.normal_quantile:g} of the run's held-back normal images' scores).")
    else:
        lines.append("No normal/defect threshold: every image went on to the defect classifier.")
    if cal is not None and cal.unknown_threshold is not None:
        lines.append(f"A defect is of an unknown type when its unknown score is above {cal.unknown_threshold:.4g} (quantile "
                     f"{cal.unknown_quantile:g} of the run's own defect images' scores).")
    fails = ("<p class='warn'>Not classified (unreadable): " + ", ".join(_e(f) for f in failed) + "</p>") if failed else ""
    return (_table(["decision", "images"], summary_rows(rows)) + "".join(f"<p>{_e(x)}</p>" for x in lines) + fails)


def _thumb(out: Path, idx: int, row: dict, cal: Calibration | None, colors: list[tuple[int, int, int]], bits: int = 16) -> str:
    """One gallery entry: the image cut around its first defect box (the whole image without
    one), linked to the full image with every crop's box and class."""
    rgb = read_image(row["image"], bits)
    defects = parse_boxes(row.get("boxes", ""))
    crops = parse_boxes(row.get("crop_boxes", ""))
    first = next((b for b in defects if b is not None), None)
    rel, full = f"img/{idx:05d}.png", f"full/{idx:05d}.jpg"
    write_image(out / rel, defect_thumbnail(rgb, first) if first is not None else fit_square(rgb, STRIP_SIZE))
    clusters = parse_clusters(row.get("crop_clusters"))
    shown = [d if d is not None else c for d, c in zip(defects, crops)]
    keep = [i for i, b in enumerate(shown) if b is not None]
    boxes = np.array([shown[i] for i in keep], np.int64).reshape(-1, 4)
    labels = [str(clusters[i]) if i < len(clusters) else "" for i in keep]
    cols = [colors[clusters[i] % len(colors)] if i < len(clusters) and clusters[i] >= 0 else (128, 128, 128) for i in keep]
    cv2.imwrite(str(out / full), np.ascontiguousarray(draw_boxes(rgb, boxes, labels, cols)[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return (f"<figure class='ex'><a href='{full}'><img src='{rel}' width='{STRIP_SIZE}' height='{STRIP_SIZE}' alt='{_e(row['id'])}'></a>"
            f"<figcaption>{_breakable(row['id'])}<br>{_e(caption(row, cal))}</figcaption></figure>")
