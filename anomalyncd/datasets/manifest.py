"""The manifest: one validated row per image, the join key of every artifact."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from ..io import InputError, atomic_path, image_size, read_mask

NORMAL = "good"


@dataclass(frozen=True)
class Record:
    """One image. ``defect_type`` is ``"good"`` for defect-free images and ``""`` when unknown
    (no ground truth); ``mask`` is ``""`` when there is none; ``split`` is ``train`` (normal
    images a detector may fit on) or ``test`` (images to classify)."""

    id: str
    image: str
    mask: str
    defect_type: str
    split: str
    category: str
    height: int = 0
    width: int = 0

    @property
    def is_normal(self) -> bool:
        return self.defect_type == NORMAL


@dataclass
class Manifest:
    records: list[Record]

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
        names = [f.name for f in fields(Record)]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=names)
                w.writeheader()
                for r in self.records:
                    w.writerow(asdict(r))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: manifest not found; run the prepare stage first (dvc repro prepare)")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        records = [
            Record(**{**row, "height": int(row["height"]), "width": int(row["width"])}) for row in rows
        ]
        return cls(records)


def build_manifest(records: Iterable[Record], progress: bool = True) -> Manifest:
    """Validate every record (image readable, mask readable and of the image's size, unique
    ids) and fill in image sizes."""
    records = list(records)
    seen: set[str] = set()
    out = []
    for r in tqdm(records, desc="prepare: checking images", disable=not progress, unit="img"):
        if r.id in seen:
            raise InputError(f"{r.image}: duplicate image id {r.id!r}; image names must be unique per folder")
        seen.add(r.id)
        h, w = image_size(r.image)
        if r.mask:
            read_mask(r.mask, shape=(h, w))
        out.append(replace(r, height=h, width=w))
    return Manifest(out)
