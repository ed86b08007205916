"""Prediction on new images with a finished run (inductive use, no retraining).

A finished run's artifacts hold every fitted component and the settings it ran with, so that
editing ``params.yaml`` after the run changes nothing here: the detector with its params
(``models/detector.pt``) and the range its maps were normalised with (``norm_min``/``norm_max``
in the map store), MEBin's search range and settings (``lo``/``hi``/``params`` in the crop
store), the trained model with its selected head, class names and evaluation transform
(``models/mgvit.pt``), the merge settings (the merge store), and, where the run had ground
truth, the matched true type of each discovered class (``metrics/evaluate_detail.json``). New images
go through the same functions as the stages (:func:`anomalyncd.mebin.mebin_image`,
:func:`anomalyncd.inference.predict_crops`, :func:`anomalyncd.merge.merge_tables`), so
predicting the run's own images reproduces its image-level predictions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from . import paths
from .config import InferParams, MebinParams, from_dict
from .datasets import IMAGE_EXTENSIONS
from .io import InputError, read_image
from .merge import Merger, merge_tables, novel_probabilities
from .store import crop_ids_of, read_crops, read_maps, read_merged

MAP_EXTENSIONS = (".npy", ".png", ".tif", ".tiff")  # what the external detector reads
CHUNK = 32  # images per detector / MEBin pass, bounds memory on large folders


@dataclass
class Run:
    """What :func:`predict_images` needs from a finished run's project directory, all of it
    read from the run's artifacts."""

    root: Path
    map_size: int  # the side of the run's maps (given maps are resized to it)
    norm_min: float
    norm_max: float
    lo: int
    hi: int
    mebin: MebinParams
    merger: Merger
    names: dict[int, str] = field(default_factory=dict)

    @property
    def detector(self) -> Path:
        return self.root / paths.DETECTOR

    @property
    def model(self) -> Path:
        return self.root / paths.MODEL


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a finished run's fitted ranges and settings from its stores (not ``params.yaml``);
    clear errors if the run is unfinished."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"{root}: run directory not found; pass the project directory of a finished run (--run)")
    for rel in (paths.MAPS, paths.CROPS, paths.MODEL, paths.MERGED):
        if not (root / rel).exists():
            raise InputError(f"{root / rel}: missing; finish the run first (cd {root} && dvc repro)")
    ms = read_maps(root / paths.MAPS)
    cs_attrs = read_crops(root / paths.CROPS).attrs
    for name, attrs, key in (
        ("norm_min", ms.attrs, paths.MAPS),
        ("norm_max", ms.attrs, paths.MAPS),
        ("lo", cs_attrs, paths.CROPS),
        ("hi", cs_attrs, paths.CROPS),
        ("params", cs_attrs, paths.CROPS),
    ):
        if name not in attrs:
            raise InputError(f"{root / key}: has no {name!r}; rerun the stage that writes it (dvc repro)")
    return Run(
        root=root,
        map_size=int(ms.maps.shape[-1]),
        norm_min=float(ms.attrs["norm_min"]),
        norm_max=float(ms.attrs["norm_max"]),
        lo=int(cs_attrs["lo"]),
        hi=int(cs_attrs["hi"]),
        mebin=from_dict(MebinParams, cs_attrs["params"], where=f"{root / paths.CROPS}: params"),
        merger=Merger.from_attrs(read_merged(root / paths.MERGED).attrs, str(root / paths.MERGED)),
        names=class_names(root / paths.EVALUATE_DETAIL),
    )


def class_names(metrics_path: Path) -> dict[int, str]:
    """Discovered class -> matched true type from an evaluate metrics file ({} if none)."""
    if not metrics_path.exists():
        return {}
    clusters = json.loads(metrics_path.read_text()).get("clusters", {})
    return {int(k): v["matched"] for k, v in clusters.items() if v.get("matched")}


def find_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(id, path) of every image named or found (recursively) in the given folders.

    A folder's images get ids ``<folder name>/<path inside it>`` without extension (so
    ``test/crack/000`` for ``.../test`` and ``crack/000`` for ``.../test/crack``); a file's id is
    its name without extension. Ids must be unique.
    """
    found: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [((item.resolve().name / p.relative_to(item)).with_suffix("").as_posix(), p) for p in files]
        elif item.is_file():
            found.append((item.stem, item))
        else:
            raise InputError(f"{item}: no such image or folder")
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {[str(i) for i in inputs]}")
    seen: dict[str, Path] = {}
    for id_, p in found:
        if id_ in seen:
            raise InputError(f"{p} and {seen[id_]} have the same name {id_!r}; pass them from one folder or rename one")
        seen[id_] = p
    return found


def find_maps(maps_dir: str | os.PathLike, ids: Sequence[str]) -> list[Path]:
    """The map file of each image id in ``maps_dir``: ``<id>.<npy|png|tif|tiff>`` (or the id's
    file name alone)."""
    root = Path(maps_dir)
    if not root.is_dir():
        raise InputError(f"{root}: maps folder not found (--maps)")
    out = []
    for id_ in ids:
        cands = [root / f"{id_}{e}" for e in MAP_EXTENSIONS] + [root / f"{Path(id_).name}{e}" for e in MAP_EXTENSIONS]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise InputError(f"{root}: no anomaly map for image {id_!r} (expected {id_}.npy or .png)")
        out.append(hit)
    return out


@dataclass
class Predictions:
    """What :func:`predict_images` made: one row per classified image, and one
    ``<file>: <what>; <how to fix>`` line per image that could not be classified."""

    rows: list[dict]
    failed: list[str] = field(default_factory=list)


def predict_images(
    run: Run,
    images: list[tuple[str, Path]],
    maps_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> Predictions:
    """Classify ``images`` ((id, path) pairs) with ``run``: one row per image as in
    ``data/merge/predictions.csv``, plus ``name``, the class's matched true type ('' if none).

    Maps come from the run's fitted detector, or from ``maps_dir``, read and resized to the
    run's map size as the ``external`` detector reads map files; either way they are
    normalised with the run's global range (``norm_min``/``norm_max``), as the run's own.
    ``batch_size``: crops per batch (default: ``infer``'s).
    An unreadable image (or map) is reported in ``failed`` and the others are classified; an
    ``InputError`` only when none can be.
    """
    from .detect import load_detector, normalise_u8
    from .inference import predict_crops
    from .mebin import mebin_image

    detector = None
    map_files = find_maps(maps_dir, [i for i, _ in images]) if maps_dir is not None else None
    if map_files is None:
        if not run.detector.exists():
            raise InputError(f"{run.detector}: no fitted detector in this run; pass --maps with its anomaly maps")
        detector = load_detector(run.detector, device=None if device == "auto" else device)

    kept: list[tuple[str, Path]] = []
    failed: list[str] = []
    crops, masks, index, boxes, regions, sizes, areas, scores = [], [], [], [], [], [], [], []
    bar = tqdm(total=len(images), desc="predict: maps + mebin", unit="img", disable=not progress)
    for s in range(0, len(images), CHUNK):
        chunk = images[s : s + CHUNK]
        files = map_files[s : s + CHUNK] if map_files is not None else [None] * len(chunk)
        loaded = []
        for item, f in zip(chunk, files):
            try:
                loaded.append((item, read_image(item[1]), None if f is None else _read_map(f, run.map_size)))
            except InputError as e:
                failed.append(str(e))
        bar.update(len(chunk) - len(loaded))
        if not loaded:
            continue
        if detector is not None:
            try:
                raw = list(detector.predict([img for _, img, _ in loaded]))
            except InputError as e:
                raise InputError(f"{e}; or pass ready anomaly maps with --maps <folder>") from e
        else:
            raw = [m for _, _, m in loaded]
        for (item, img, _), m in zip(loaded, raw):
            # the run's global map range, as the detect stage normalised the run's own maps
            map_u8 = normalise_u8(m, run.norm_min, run.norm_max)
            _, c = mebin_image(map_u8, img, run.lo, run.hi, run.mebin)
            crops.append(c.crops)
            masks.append(c.crop_masks)
            boxes.append(c.boxes)
            regions.append(c.regions)
            sizes.append(img.shape[:2])
            areas.append(c.areas)
            scores.append(c.scores)
            index.append(np.full(len(c), len(kept), np.int64))
            kept.append(item)
            bar.update()
    bar.close()
    if not kept:
        raise InputError(f"none of the {len(images)} images could be classified; the first: {failed[0]}")

    crops_a = np.concatenate(crops)
    ps = predict_crops(run.model, crops_a, np.concatenate(masks), device, batch_size or InferParams().batch_size)
    crop_probs = novel_probabilities(ps.probs, ps.head, int(ps.attrs.get("num_labeled", 0)))
    image_index = np.concatenate(index)
    ids = [i for i, _ in kept]
    rows, _, _ = merge_tables(
        ids=ids,
        images=[str(p) for _, p in kept],
        categories=[""] * len(kept),
        crop_ids=crop_ids_of(ids, image_index),
        image_index=image_index,
        boxes=np.concatenate(boxes).reshape(-1, 4),
        regions=np.concatenate(regions).reshape(-1, 4),
        image_sizes=np.array(sizes).reshape(-1, 2),
        areas=np.concatenate(areas),
        scores=np.concatenate(scores),
        crop_probs=crop_probs,
        merger=run.merger,
    )
    first = ("id", "image", "cluster")
    rows = [
        {**{c: r[c] for c in first}, "name": run.names.get(int(r["cluster"]), "")}
        | {c: v for c, v in r.items() if c not in first and c != "category"}
        for r in rows
    ]
    return Predictions(rows, failed)


def _read_map(path: Path, size: int) -> np.ndarray:
    """A map file as the ``external`` detector reads it, resized to ``size`` x ``size``."""
    import cv2

    from .detect.external import read_map_file

    return cv2.resize(read_map_file(path), (size, size), interpolation=cv2.INTER_LINEAR)
