"""Synthetic feature sets with a known number of classes: the test bench of
``train.num_classes: auto`` (``tests/test_num_classes.py``, ``benchmarks/bench_num_classes.py synthetic``).

Each set mimics the crops' region features: a large component shared by every row (the
features are L2-normalised before clustering, as the classifier's are), classes that differ in
a few directions only, and within-class noise whose variance decays over the dimensions (a
few strong directions, many weak ones), so that even one class is elongated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    """A synthetic set: ``sizes`` rows per class (one entry: no structure), class centres
    ``separation`` within-class standard deviations apart (the closest pair), noise spectrum
    decaying as ``j ** -decay`` over the dimensions."""

    name: str
    sizes: tuple[int, ...]
    separation: float = 6.0
    decay: float = 0.5

    @property
    def k(self) -> int:
        return len(self.sizes)


#: the bench: no structure (round and elongated), equal classes, unequal sizes, one class of
#: 5 % of the rows, overlapping classes, and MTD's class sizes at a moderate overlap
CASES = (
    Case("none, round", (300,), decay=0.0),
    Case("none, elongated", (300,), decay=0.5),
    Case("2 equal", (100, 100)),
    Case("3 equal", (80, 80, 80)),
    Case("5 equal", (60,) * 5),
    Case("8 equal", (40,) * 8),
    Case("4 unequal", (160, 80, 40, 20)),
    Case("5, one of 5 %", (95, 95, 95, 95, 20)),
    Case("4 overlapping", (80,) * 4, separation=4.0),
    Case("MTD sizes, overlapping", (115, 85, 57, 32, 103), separation=4.5),
)


def mixture(case: Case, seed: int, dim: int = 64, class_dims: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one synthetic set: features float32 (M, dim) and class labels int (M,).

    The within-class noise has standard deviation ``j ** (-decay / 2)`` along the j-th of
    random orthogonal directions, scaled to unit mean variance; class centres lie in a random
    ``class_dims``-dimensional subspace, placed at random and rescaled so that the closest two
    are ``case.separation`` apart (in units of the noise's root-mean-square standard deviation).
    """
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    sd = np.arange(1, dim + 1, dtype=np.float64) ** (-case.decay / 2)
    sd /= np.sqrt(np.mean(sd**2))
    k = case.k
    centres = np.zeros((k, dim))
    if k > 1:
        basis, _ = np.linalg.qr(rng.normal(size=(dim, class_dims)))
        centres = rng.normal(size=(k, class_dims)) @ basis.T
        gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(k) for j in range(i + 1, k)]
        centres *= case.separation / min(gaps)
    common = 8 * rng.normal(size=dim)  # norm about 8 sqrt(dim), the noise's sqrt(dim)
    xs, ys = [], []
    for c, n in enumerate(case.sizes):
        noise = (rng.normal(size=(n, dim)) * sd) @ rot.T
        xs.append(common + centres[c] + noise)
        ys.append(np.full(n, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
