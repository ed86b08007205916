"""The curated set as a labelled data set (``anomalyncd export``).

Layout, the one ``train.base_dir`` reads (``stages.train.read_base_set``) and folder-per-class
image-classification tools read::

    <out>/<class name>/<image id>_<k>.png        the k-th crop of the image, as the classifier saw it (RGB)
    <out>/<class name>/<image id>_<k>_mask.png   its mask (0 / 255)
    <out>/labels.csv                             file, mask, class, cluster, image, image_id, box, crop_box
    <out>/.anomalyncd-export                     marks a folder export may replace

Every crop with an anomaly region is exported under the curated class of its own cluster; crops
of rejected clusters (not a defect) and the whole-image crops of images without anomaly are
not. ``/`` in an image id becomes ``__`` in the file name. :func:`plan_export` is pure;
:func:`write_export` writes the folder atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .catalog import CuratedClass
from .io import InputError, atomic_path, write_image
from .merge import clip_box, write_table

MARKER = ".anomalyncd-export"
TABLE = "labels.csv"


def folder_name(name: str) -> str:
    """A class name as a folder name (``/``, from ``<category>/<type>`` names, becomes ``-``)."""
    return name.replace("/", "-").replace("\\", "-")


@dataclass(frozen=True)
class ExportItem:
    """One exported crop: its row in the crop store, its class folder and its file stem."""

    crop: int
    folder: str
    stem: str
    cluster: int
    name: str


def plan_export(
    crop_ids: Sequence[str], crop_clusters: np.ndarray, areas: np.ndarray, classes: Sequence[CuratedClass]
) -> list[ExportItem]:
    """The crops to export, in crop order: those with a region (``areas`` (M,) > 0) whose
    cluster (``crop_clusters`` (M,)) is not rejected, each under its curated class's folder."""
    of = {c.cluster: c for c in classes}
    items = []
    for j, (cid, k, a) in enumerate(zip(crop_ids, np.asarray(crop_clusters).tolist(), np.asarray(areas).tolist())):
        c = of.get(int(k))
        if a > 0 and c is not None and not c.rejected:
            items.append(ExportItem(j, folder_name(c.name), cid.replace("/", "__").replace("#", "_"), int(k), c.name))
    return items


def check_out(out: str | os.PathLike) -> Path:
    """``out`` if export may write there: new, an empty folder, or a folder export wrote
    (:data:`MARKER`); anything else is an ``InputError`` and is left as it is."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; choose a new folder for --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(
            f"{out}: folder not empty and not written by anomalyncd export; choose a new or empty folder for --out "
            "(export never deletes a folder it did not write)"
        )
    return out


def write_export(
    out: str | os.PathLike,
    items: Sequence[ExportItem],
    crop: Callable[[int], tuple[np.ndarray, np.ndarray]],
    image_of: Callable[[int], tuple[str, str]],
    boxes: np.ndarray,
    regions: np.ndarray,
    image_size: Callable[[int], Sequence[int]],
) -> Path:
    """Write the export to ``out`` atomically (:func:`check_out` first). ``crop(j)``: crop ``j``'s
    RGB uint8 (C, C, 3) and mask (C, C); ``image_of(j)``: its (image path, image id);
    ``boxes``, ``regions``: int (M, 4) context and defect boxes; ``image_size(j)``: its image's (H, W)."""
    out = check_out(out)
    if not items:
        raise InputError("nothing to export: no crop with an anomaly region in a class that is not rejected")
    rows = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / MARKER).write_text("written by anomalyncd export, which replaces this folder on every run\n")
        for it in items:
            rgb, mask = crop(it.crop)
            rel = Path(it.folder) / f"{it.stem}.png"
            rel_mask = Path(it.folder) / f"{it.stem}_mask.png"
            write_image(tmp / rel, rgb)
            write_image(tmp / rel_mask, (np.asarray(mask) > 0).astype(np.uint8) * 255)
            image, image_id = image_of(it.crop)
            size = image_size(it.crop)
            rows.append(
                {
                    "file": rel.as_posix(),
                    "mask": rel_mask.as_posix(),
                    "class": it.name,
                    "cluster": it.cluster,
                    "image": image,
                    "image_id": image_id,
                    "box": " ".join(map(str, clip_box(regions[it.crop], size))),
                    "crop_box": " ".join(map(str, clip_box(boxes[it.crop], size))),
                }
            )
        write_table(tmp / TABLE, rows)
    return out
