"""The manifest: one validated row per image, the join key of every artifact."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from ..io import BIT_DEPTHS, InputError, InputWarning, atomic_path, image_info, is_binary_mask, read_image, read_mask_levels, significant_bits

NORMAL = "good"
SHOW_FILES = 3  # files named in a warning about many


@dataclass(frozen=True)
class Record:
    """One image. ``defect_type`` is ``"good"`` for defect-free images and ``""`` when unknown
    (no ground truth); ``mask`` is ``""`` when there is none; ``split`` is ``train`` (normal
    images a detector may fit on) or ``test`` (images to classify); ``bits``: the significant
    bits of the data set's 16-bit images (:func:`anomalyncd.io.significant_bits`, the same for
    every record; 16 for a set without them), which :meth:`read` scales them from."""

    id: str
    image: str
    mask: str
    defect_type: str
    split: str
    category: str
    height: int = 0
    width: int = 0
    bits: int = 16

    @property
    def is_normal(self) -> bool:
        return self.defect_type == NORMAL

    def read(self):
        """The image as RGB ``uint8`` ``(H, W, 3)`` (:func:`anomalyncd.io.read_image` with the set's ``bits``)."""
        return read_image(self.image, self.bits)


def set_bits(records: Sequence[Record]) -> int:
    """The significant bits the records' 16-bit images are read with (every record of a set
    holds the same; 16 for no records)."""
    return records[0].bits if records else 16


@dataclass
class Manifest:
    records: list[Record]

    @property
    def bits(self) -> int:
        """The significant bits of the set's 16-bit images (:func:`set_bits`)."""
        return set_bits(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def to_classify(self, include_normal: bool = False) -> list[Record]:
        """The images the pipeline classifies, in manifest order."""
        return [r for r in self.records if r.split == "test" and (include_normal or not r.is_normal)]

    def by_id(self) -> dict[str, Record]:
        """Records keyed by image id (the join key of every artifact)."""
        return {r.id: r for r in self.records}

    def train_normal(self) -> list[Record]:
        return [r for r in self.records if r.split == "train"]

    @property
    def has_ground_truth(self) -> bool:
        return any(r.defect_type for r in self.records if r.split == "test")

    def write(self, path: str | os.PathLike) -> None:
        """The manifest CSV; its ``bits`` column only where it is not 16 (so the manifest of an
        8-bit set is what it was before the column existed)."""
        names = [f.name for f in fields(Record) if f.name != "bits" or any(r.bits != 16 for r in self.records)]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=names)
                w.writeheader()
                for r in self.records:
                    w.writerow({k: v for k, v in asdict(r).items() if k in names})

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: manifest not found; run the prepare stage first (dvc repro prepare)")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
        return cls(parse_records(rows, columns, str(path)))


def manifest_bits(path: str | os.PathLike) -> int:
    """The significant bits of a data set's 16-bit images, from its manifest's first row
    (without reading the whole file; 16 for a manifest without the column or rows)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        first = next(reader, None)
        columns = reader.fieldnames or []
    return parse_records([first], columns, str(path))[0].bits if first else 16


def parse_records(rows: list[dict], columns: list[str], where: str) -> list[Record]:
    """Records from a manifest's CSV rows: a missing column, a row with too few or too many
    fields and a size that is not a positive integer are an ``InputError`` naming ``where``."""
    fix = "rerun the prepare stage (dvc repro prepare)"
    names = [f.name for f in fields(Record) if f.name != "bits" or "bits" in columns]  # bits: 16 when absent
    missing = [n for n in names if n not in columns]
    if missing:
        raise InputError(f"{where}: damaged (no column {', '.join(missing)}); {fix}")
    records = []
    for line, row in enumerate(rows, start=2):
        if None in row or any(row[n] is None for n in names):
            raise InputError(f"{where}: damaged (line {line} has {'more' if None in row else 'fewer'} fields than the header); {fix}")
        try:
            h, w = int(row["height"]), int(row["width"])
        except ValueError:
            h = w = 0
        if h < 1 or w < 1:
            raise InputError(f"{where}: damaged (line {line}: size {row['height']!r} x {row['width']!r} is not two positive integers); {fix}")
        bits = row.get("bits", "16")
        if bits not in [str(b) for b in BIT_DEPTHS]:
            raise InputError(f"{where}: damaged (line {line}: bits {bits!r} is not one of {', '.join(map(str, BIT_DEPTHS))}); {fix}")
        records.append(Record(**{n: row[n] for n in names if n not in ("height", "width", "bits")}, height=h, width=w, bits=int(bits)))
    return records


def build_manifest(records: Iterable[Record], progress: bool = True) -> Manifest:
    """Validate every record (image readable, mask readable and of the image's size, unique
    ids) and fill in image sizes, and the significant bits of the set's 16-bit images (their
    brightest pixel's :func:`anomalyncd.io.significant_bits`). Masks that are not binary get one :class:`InputWarning`
    naming them: the pipeline cuts them at half range (``anomalyncd.io.binarise_mask``)."""
    records = list(records)
    seen: set[str] = set()
    out, soft, peaks = [], [], []
    flat: dict[str, list[str]] = {"black": [], "white": []}
    for r in tqdm(records, desc="prepare: checking images", disable=not progress, unit="img"):
        if r.id in seen:
            raise InputError(f"{r.image}: duplicate image id {r.id!r}; image names must be unique per folder")
        seen.add(r.id)
        h, w, peak = image_info(r.image)
        peaks.append(peak)
        if r.mask:
            levels = read_mask_levels(r.mask, shape=(h, w))
            if not is_binary_mask(levels):
                soft.append(r.mask)
            elif not r.is_normal and levels.min() == levels.max():
                flat["black" if levels.max() == 0 else "white"].append(r.mask)
        out.append(replace(r, height=h, width=w))
    if soft:
        warnings.warn(soft_mask_warning(soft, sum(1 for r in records if r.mask)), InputWarning, stacklevel=2)
    for colour, files in flat.items():
        if files:
            warnings.warn(flat_mask_warning(files, colour), InputWarning, stacklevel=2)
    bits = significant_bits(peaks)
    return Manifest([replace(r, bits=bits) for r in out])


def flat_mask_warning(files: list[str], colour: str) -> str:
    """The warning for masks of defect images that are all black (no defect marked) or all
    white (the whole image marked)."""
    more = f" and {len(files) - SHOW_FILES} more" if len(files) > SHOW_FILES else ""
    what = "mark no defect pixel" if colour == "black" else "mark the whole image as the defect"
    return (
        f"{', '.join(files[:SHOW_FILES])}{more}: {len(files)} mask(s) of defect images are all {colour} (they {what}); "
        "the detection and evaluation scores use them as they are: check these masks"
    )


def soft_mask_warning(soft: list[str], n_masks: int) -> str:
    """The warning for masks with more than two grey levels (blurred, anti-aliased, JPEG)."""
    more = f" and {len(soft) - SHOW_FILES} more" if len(soft) > SHOW_FILES else ""
    return (
        f"{', '.join(soft[:SHOW_FILES])}{more}: {len(soft)} of {n_masks} masks are not binary (more than two grey "
        "levels); their pixels at half the mask's peak or above are taken as the defect. Save binary masks "
        "(0 and 255) if that is not what they mean"
    )
