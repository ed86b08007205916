"""Readers for the supported folder layouts, behind the ``READERS`` registry.

Each reader takes the dataset root and the ``dataset`` params and returns records with paths
filled in; sizes are filled in later by :func:`build_manifest`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

from ..config import DatasetParams
from ..io import InputError, InputWarning
from .manifest import NORMAL, Record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Reader = Callable[[Path, DatasetParams], list[Record]]
READERS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def read_dataset(params: DatasetParams) -> list[Record]:
    """Read the dataset described by ``params`` (layout and root)."""
    root = Path(params.root)
    if params.layout not in READERS:
        raise InputError(f"params.yaml: dataset.layout {params.layout!r} is unknown; use one of {sorted(READERS)}")
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found; set dataset.root in params.yaml")
    if params.normal_root and params.layout != "folder":
        raise InputError(
            f"params.yaml: dataset.normal_root is for dataset.layout folder (layout {params.layout!r} has its own "
            "normal images); set it to \"\""
        )
    records = READERS[params.layout](root, params)
    if not records:
        raise InputError(f"{root}: no images found for layout {params.layout!r}")
    return records


def _images(folder: Path) -> list[Path]:
    return _image_files(folder.iterdir())


def _image_files(paths: Iterable[Path]) -> list[Path]:
    """The image files among ``paths``, sorted; a broken symbolic link is an ``InputError``."""
    return sorted(p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and _exists(p) and p.is_file())


def _exists(p: Path) -> bool:
    """Whether ``p`` exists; a symbolic link to nothing is an ``InputError`` naming it."""
    if p.is_symlink() and not p.exists():
        raise InputError(f"{p}: broken symbolic link (to {os.readlink(p)}, which does not exist); fix or remove it")
    return p.exists()


def _rel_id(*parts: str) -> str:
    return "/".join(parts)


@register("mvtec")
def read_mvtec(root: Path, params: DatasetParams) -> list[Record]:
    """``<root>/<category>/train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
    if not found and (root / "test").is_dir():  # the root is itself one category
        raise InputError(
            f"{root}: is one MVTec category (it holds test/), and dataset.root is the folder of the categories; "
            f"set dataset.root={root.parent} and dataset.categories=[{root.name}]"
        )
    if not found:
        raise InputError(
            f"{root}: no MVTec categories found (expected {root}/<category>/test/<type>/*.png); "
            "check dataset.root and dataset.layout"
        )
    cats = params.categories or found
    missing = sorted(set(cats) - set(found))
    if missing:
        raise InputError(f"{root}: categories {missing} not found; present: {found}")
    records: list[Record] = []
    for cat in cats:
        base = root / cat
        train = base / "train" / NORMAL
        for p in _images(train) if train.is_dir() else []:
            records.append(Record(_rel_id(cat, "train", NORMAL, p.stem), str(p), "", NORMAL, "train", cat))
        types = sorted(d.name for d in (base / "test").iterdir() if d.is_dir())
        if not types:
            raise InputError(f"{base / 'test'}: empty; expected one folder per defect type (and 'good')")
        for t in types:
            imgs = _images(base / "test" / t)
            if not imgs:
                raise InputError(f"{base / 'test' / t}: folder has no images")
            for p in imgs:
                mask = ""
                if t != NORMAL:
                    m = base / "ground_truth" / t / f"{p.stem}_mask.png"
                    if not _exists(m):
                        raise InputError(f"{p}: no mask at {m}; every defect image needs its ground-truth mask")
                    mask = str(m)
                records.append(Record(_rel_id(cat, "test", t, p.stem), str(p), mask, t, "test", cat))
    return records


@register("mtd")
def read_mtd(root: Path, params: DatasetParams) -> list[Record]:
    """Raw Magnetic Tile Defect layout: ``MT_<Type>/Imgs/<name>.jpg`` + same-named ``.png``
    mask; ``MT_Free`` is normal, split into train/test by ``dataset.train_list``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("MT_"))
    if not folders:
        raise InputError(f"{root}: no MT_<Type> folders; is this the MTD dataset? check dataset.root")
    train_list = root / params.train_list
    if not train_list.exists():
        raise InputError(f"{train_list}: normal training list not found; set dataset.train_list")
    train_names = {line.strip() for line in train_list.read_text().splitlines() if line.strip()}
    records: list[Record] = []
    for folder in folders:
        kind = folder.name[3:]
        normal = kind == "Free"
        imgs = [p for p in _images(folder / "Imgs") if p.suffix.lower() == ".jpg"]
        if not imgs:
            raise InputError(f"{folder / 'Imgs'}: no .jpg images")
        for p in imgs:
            mask = p.with_suffix(".png")
            if not normal and not _exists(mask):
                raise InputError(f"{p}: no mask at {mask}")
            if normal:
                split = "train" if p.name in train_names else "test"
                records.append(Record(_rel_id("mtd", split, NORMAL, p.stem), str(p), "", NORMAL, split, "mtd"))
            else:
                t = kind.lower()
                records.append(Record(_rel_id("mtd", "test", t, p.stem), str(p), str(mask), t, "test", "mtd"))
    return records


def _tree(folder: Path) -> list[Path]:
    return _image_files(folder.rglob("*"))


@register("folder")
def read_folder(root: Path, params: DatasetParams) -> list[Record]:
    """Any folder of images, searched recursively; no labels, all images are classified.

    ``dataset.normal_root``, if set, is a folder of known-good images (searched recursively)
    for the detectors that fit on normal images: rows ``<category>/train/good/<path>`` of split
    ``train``. Inside ``root`` it is left out of the images to classify."""
    cat = root.resolve().name
    normal: list[Path] = []
    if params.normal_root:
        good = Path(params.normal_root)
        if not good.is_dir():
            raise InputError(f"{good}: dataset.normal_root folder not found; set it to a folder of known-good images, or \"\"")
        normal = _tree(good)
        if not normal:
            raise InputError(f"{good}: dataset.normal_root holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if not good.resolve().is_relative_to(root.resolve()):
            warnings.warn(InputWarning(
                f"{good}: dataset.normal_root lies outside dataset.root {root}, so DVC does not see changes to its "
                "images (dvc repro -f prepare after changing them); a subfolder of dataset.root is tracked with it"
            ))
    skip = {p.resolve() for p in normal}
    records = [
        Record(_rel_id(cat, "train", NORMAL, p.relative_to(params.normal_root).with_suffix("").as_posix()), str(p), "", NORMAL, "train", cat)
        for p in normal
    ]
    return records + [
        Record(_rel_id(cat, p.relative_to(root).with_suffix("").as_posix()), str(p), "", "", "test", cat)
        for p in _tree(root)
        if p.resolve() not in skip
    ]
