"""Comparing two finished runs of one project (e.g. on CPU and on CUDA): are their anomaly maps
within a tolerance, their crops the same, their image clusters the same partition?

Used by ``benchmarks/gpu_check.py``. A GPU's kernels (cuDNN convolutions, TF32 matmuls, other
summation orders) give float results that differ from the CPU's in the last bits, so maps are
compared with a tolerance in grey levels of the stored uint8 maps, and clusters as partitions
(the same images together), not as label ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import paths
from .io import InputError
from .store import StoreReader

#: Default tolerance: the uint8 maps (0..255 on the run's global range) may differ by this many
#: grey levels at any pixel.
MAP_TOLERANCE = 2


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether labels ``a`` and ``b`` (N,) group the N items alike, whatever the label ids."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def map_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Largest and mean absolute difference of two uint8 map sets of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"map sets of shapes {a.shape} and {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return (int(d.max()), float(d.mean())) if d.size else (0, 0.0)


@dataclass
class RunComparison:
    """What :func:`compare_runs` found: map differences in grey levels, crops with other boxes,
    images in another cluster (after matching the clusters one to one), the partitions' equality."""

    images: int
    map_max: int
    map_mean: float
    crops: tuple[int, int]  # number of crops in a, in b
    boxes_differ: int  # crops whose box differs (all of them if the counts differ)
    same_clusters: bool
    tolerance: int = MAP_TOLERANCE

    @property
    def ok(self) -> bool:
        """Maps within the tolerance and the same image clusters."""
        return self.map_max <= self.tolerance and self.same_clusters

    def summary(self) -> str:
        return (f"{self.images} images: maps differ by <= {self.map_max} grey levels (mean {self.map_mean:.3f}, "
                f"tolerance {self.tolerance}); crops {self.crops[0]} / {self.crops[1]}, {self.boxes_differ} with "
                f"another box; image clusters {'the same' if self.same_clusters else 'DIFFERENT'}")


def compare_runs(a: str | os.PathLike, b: str | os.PathLike, tolerance: int = MAP_TOLERANCE) -> RunComparison:
    """Compare the maps, crop boxes and image clusters of two finished runs of one data set."""
    a, b = Path(a), Path(b)
    ids, u8, boxes, clusters = [], [], [], []
    for root in (a, b):
        with StoreReader(root / paths.MAPS, "maps") as r:
            ids.append(list(r.attrs["ids"]))
            u8.append(r.read("maps_u8"))
        with StoreReader(root / paths.CROPS, "crops") as r:
            boxes.append(r.read("boxes").reshape(-1, 4))
        with StoreReader(root / paths.MERGED, "merged") as r:
            clusters.append(r.read("clusters"))
    if ids[0] != ids[1]:
        raise InputError(f"{a} and {b}: the runs mapped different images; compare runs of one data set")
    mx, mean = map_difference(u8[0], u8[1])
    n_a, n_b = len(boxes[0]), len(boxes[1])
    differ = int((boxes[0] != boxes[1]).any(axis=1).sum()) if n_a == n_b else max(n_a, n_b)
    return RunComparison(len(ids[0]), mx, mean, (n_a, n_b), differ, same_partition(*clusters), tolerance)
