"""The detect stage's data flow in bounded memory: maps made a chunk of images at a time into a
part store, then gathered into the maps store (see :mod:`anomalyncd.shard`).

The maps store holds the raw maps and their 0..255 version over the min-max of the whole set,
so the gathering reads the parts twice: once for the range, once to write.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..datasets import Record
from ..image_score import ImageScore, top_means
from ..io import InputError
from ..shard import Parts
from ..store import StoreWriter
from .base import Detector, normalise_u8

#: Images mapped per call of the detector (rounded up to a multiple of its batch size).
IMAGES_PER_CHUNK = 64
PART_KIND = "maps-part"


def chunk_size(det: Detector, n: int) -> int:
    """Images per call: all of them for a detector that maps a set jointly."""
    if det.maps_jointly:
        return max(n, 1)
    bs = max(1, det.params.batch_size)
    return -(-IMAGES_PER_CHUNK // bs) * bs


def nonfinite_ids(maps: np.ndarray, records: Sequence[Record]) -> list[str]:
    """Ids of the ``records`` whose maps (N, ...) hold NaN or inf."""
    ok = np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    return [r.id for r, good in zip(records, ok) if not good]


def map_part(det: Detector, records: Sequence[Record], path: str | os.PathLike, tops: Sequence[float]) -> None:
    """Map ``records`` a chunk at a time into the part store ``path``: ``maps`` float32 (n, S, S)
    and ``top_means`` float64 (n, len(tops)) of the maps the image score is drawn from
    (:meth:`~.base.Detector.map_records_scored`; :func:`~anomalyncd.image_score.top_means`).

    A NaN or infinite map is an ``InputError`` counting them all, raised once every image is
    mapped; the part is then not written.
    """
    size = det.params.map_size
    step = chunk_size(det, len(records))
    bad: list[str] = []
    with StoreWriter(path, PART_KIND) as w:
        w.declare("maps", (size, size), np.float32)
        w.declare("top_means", (len(tops),), np.float64)
        for a in range(0, len(records), step):
            chunk = records[a : a + step]
            maps, scored = (np.asarray(m, dtype=np.float32) for m in det.map_records_scored(chunk))
            bad += nonfinite_ids(np.stack([maps, scored], axis=1), chunk)
            w.append("maps", maps)
            w.append("top_means", top_means(scored, tops))
        if bad:
            raise InputError(
                f"params.yaml: detect.method {det.method} made NaN or infinite maps for {len(bad)} image(s), "
                f"e.g. {bad[:3]}; try another detect.method or backbone"
            )


def value_range(parts: Parts, n: int) -> tuple[float, float]:
    """Min and max of the first ``n`` maps of ``parts``."""
    lo, hi = np.inf, -np.inf
    for m in parts.chunks("maps", n):
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    return lo, hi


def gather_maps(
    parts: Parts, path: str | os.PathLike, todo: Sequence[Record], attrs: dict, score: ImageScore
) -> tuple[float, float]:
    """Write the maps store ``path`` from the first ``len(todo)`` maps of ``parts``: maps,
    maps_u8 over their global ``(lo, hi)``, image scores (``score`` of the parts' top means)
    and image sizes. ``attrs`` gets ``norm_min``/``norm_max`` after ``pretrained``. Returns
    ``(lo, hi)``."""
    n = len(todo)
    lo, hi = value_range(parts, n)
    head = dict(attrs)
    ordered = {"ids": [r.id for r in todo]}
    for k, v in head.items():
        ordered[k] = v
        if k == "pretrained":
            ordered.update(norm_min=lo, norm_max=hi)
    ordered.setdefault("norm_min", lo)
    ordered.setdefault("norm_max", hi)
    with StoreWriter(path, "maps", ordered) as w:
        for m in parts.chunks("maps", n):
            w.append("maps", m, np.float32)
            w.append("maps_u8", normalise_u8(m, lo, hi), np.uint8)
        for t in parts.chunks("top_means", n):
            w.append("scores", score.of_top_means(t), np.float32)
        w.append("image_sizes", np.array([[r.height, r.width] for r in todo], np.int32).reshape(-1, 2))
    return lo, hi


def map_scores(parts: Parts, score: ImageScore) -> np.ndarray:
    """float32 (N,): the image score of every image of ``parts``."""
    out = [score.of_top_means(t) for t in parts.chunks("top_means")]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def metric_sample(n: int, cap: int) -> np.ndarray:
    """Indices of the images whose maps the pixel metrics use: all ``n`` up to ``cap``, else
    ``cap`` evenly spaced ones (the metrics of a large set in bounded memory)."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(int))
