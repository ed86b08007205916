"""Maps made by another detector (anomalib, the AnomalyNCD authors' published maps, your own).

``detect.external_dir`` holds one map per image: PNG or TIFF (8- or 16-bit, or float TIFF) or
``.npy`` (float). A map is matched to its image by the first of these keys that names a file
(relative paths without extension, compared case-insensitively):

1. the image id (``tile/test/crack/000``);
2. the image's path under ``dataset.root`` (``tile/test/crack/000`` for MVTec,
   ``MT_Crack/Imgs/exp1_num_4`` for MTD);
3. the layout published with AnomalyNCD: ``<category>/<defect_type>/<image_name>``;
4. ``<defect_type>/<image_name>``;
5. the bare image name, when exactly one map file has it.

A missing map is an error listing the first image ids without one; so is a map that several
images would share (two images named ``000.png`` in different folders and one ``000.npy``). A
map whose size differs from its image is resized, with a warning. Maps are resized to
``detect.map_size``; 8- and 16-bit PNG/TIFF maps are scaled to [0, 1] by their bit depth, any
other map keeps its values (``.npy`` of any number type). NaN or infinite values are an error.
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath
from typing import Sequence

import cv2
import numpy as np

from ..datasets import Record
from ..io import InputError, InputWarning, decode_image
from .base import register
from .described import DescribedMaps

MAP_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
SHOW_MISSING = 5


def read_map_file(path: str | Path) -> np.ndarray:
    """One map file as float32 ``(H, W)``: 8/16-bit images scaled to [0, 1], other values kept."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path)
        except Exception as e:  # noqa: BLE001 - any numpy failure is a bad file
            raise InputError(f"{path}: cannot read this .npy map ({e})") from e
    else:
        arr = decode_image(path, what="map image")
    arr = np.squeeze(arr)
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise InputError(
                f"{path}: map has {arr.shape[2]} different channels; save one-channel (grayscale) maps, "
                "not colour heat maps"
            )
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{path}: a map must be 2-D, got shape {arr.shape}")
    if path.suffix.lower() != ".npy" and arr.dtype in (np.uint8, np.uint16):
        arr = arr / float(np.iinfo(arr.dtype).max)  # an 8- or 16-bit image: its bit depth is its range
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{path}: map values are {arr.dtype}; save numbers (float or integer)")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(
            f"{path}: map has {int((~np.isfinite(arr)).sum())} NaN or infinite values; "
            "fix the detector's output (every pixel needs a finite score)"
        )
    return arr


def index_maps(root: Path) -> dict[str, Path]:
    """Every map file under ``root`` keyed by lower-case relative path without extension."""
    if not root.is_dir():
        raise InputError(f"{root}: external map folder not found; set detect.external_dir in params.yaml")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in MAP_EXTENSIONS:
            key = p.relative_to(root).with_suffix("").as_posix().lower()
            out.setdefault(key, p)
    if not out:
        raise InputError(f"{root}: no map files ({', '.join(MAP_EXTENSIONS)}) found")
    return out


def candidate_keys(record: Record, dataset_root: str) -> list[str]:
    """The relative keys (lower case, no extension) a record's map may be stored under."""
    stem = Path(record.image).stem
    keys = [record.id]
    if dataset_root:
        try:
            keys.append(Path(record.image).resolve().relative_to(Path(dataset_root).resolve()).with_suffix("").as_posix())
        except ValueError:
            pass
    if record.defect_type:
        keys += [f"{record.category}/{record.defect_type}/{stem}", f"{record.defect_type}/{stem}"]
    return [k.lower() for k in keys]


def match_maps(records: Sequence[Record], index: dict[str, Path], dataset_root: str = "") -> list[Path]:
    """The map file of each record (see the module docstring for the rules)."""
    by_stem: dict[str, list[Path]] = {}
    for key, p in index.items():
        by_stem.setdefault(PurePosixPath(key).name, []).append(p)
    found, missing = [], []
    for r in records:
        hit = next((index[k] for k in candidate_keys(r, dataset_root) if k in index), None)
        if hit is None:
            same = by_stem.get(Path(r.image).stem.lower(), [])
            hit = same[0] if len(same) == 1 else None
        if hit is None:
            missing.append(r.id)
        found.append(hit)
    if missing:
        shown = ", ".join(missing[:SHOW_MISSING]) + (" ..." if len(missing) > SHOW_MISSING else "")
        raise InputError(
            f"detect.external_dir: no map for {len(missing)} of {len(records)} images ({shown}); name each map "
            "like its image id, its path under dataset.root, or <category>/<defect_type>/<image_name>.png"
        )
    check_one_image_per_map(records, found)
    return found  # type: ignore[return-value]


def check_one_image_per_map(records: Sequence[Record], files: Sequence[Path]) -> None:
    """Raise ``InputError`` if one map file was matched to several images (by a shared name)."""
    users: dict[Path, list[str]] = {}
    for r, f in zip(records, files):
        users.setdefault(f, []).append(r.id)
    shared = {f: ids for f, ids in users.items() if len(ids) > 1}
    if shared:
        f, ids = next(iter(shared.items()))
        raise InputError(
            f"{f}: the one map of {len(ids)} images ({', '.join(ids[:SHOW_MISSING])}), and {len(shared)} such map(s) "
            "in all; give each image its own map, named like its image id or its path under dataset.root"
        )


@register("external")
class External(DescribedMaps):
    """Reads maps from ``detect.external_dir``; it cannot map new images."""

    weights = "external maps"
    maps_jointly = True

    def map_records(self, records: Sequence[Record]) -> np.ndarray:
        if not self.params.external_dir:
            raise InputError("params.yaml: detect.method external needs detect.external_dir (the folder of maps)")
        files = match_maps(records, index_maps(Path(self.params.external_dir)), self.context.dataset_root)
        size = self.params.map_size
        out = np.zeros((len(records), size, size), dtype=np.float32)
        resized = []
        for i, (r, f) in enumerate(zip(records, files)):
            m = read_map_file(f)
            if r.height and r.width and m.shape != (r.height, r.width):
                resized.append(f"{f.name} {m.shape[1]}x{m.shape[0]} (image {r.width}x{r.height})")
            out[i] = cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)
        if resized:
            warnings.warn(
                f"detect: {len(resized)} external maps differ in size from their images and were resized, "
                f"e.g. {'; '.join(resized[:3])}",
                InputWarning,
                stacklevel=2,
            )
        return out

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise InputError(
            "this detector reads maps made elsewhere (detect.method external) and cannot map new images; "
            "make their maps with your detector, or run detect with patchcore or musc"
        )
