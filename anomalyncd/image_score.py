"""The image anomaly score: how one number per image is drawn from its anomaly map.

A defect may be a speck or cover a third of the part. The mean of a map's top ``q`` fraction of
pixels fits defects of about that area: a small ``q`` lets a large, faint region average with
nothing, a large ``q`` averages a speck away. So the score looks at several areas
(``detect.score_tops``, a ladder from 0.1 % to 30 % of the map) and asks, at each, how far the
image is above normal images: each top mean is standardised by the median and spread (MAD) of
the same top mean over the normal images ``detect`` held back from the fit, and the image score
is the largest of these robust z-scores. The held-back images are the reference because the
detector never saw them (the images it was fitted on score low at every area). Their own scores,
on which predict's normal/defect threshold is taken, are each standardised on the others
(:meth:`ImageScore.reference_scores`), as a new normal image is: scored on themselves, a few
held-back images look more alike than new ones and the threshold falls too low.

Without such a reference (``musc``, ``external`` and ``ground_truth`` fit on no normal images,
or ``detect.holdout: 0``) the score is the mean of the top means: the same ladder, in the map's
own units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import InputError

MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


def top_means(maps: np.ndarray, tops: tuple[float, ...] | list[float]) -> np.ndarray:
    """float64 ``(N, S)``: for each map of ``maps`` ``(N, H, W)`` the mean of its ``tops[s]``
    fraction of highest pixels (at least one pixel; ``0``: the maximum)."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), int(np.prod(maps.shape[1:])))
    out = np.empty((len(flat), len(tops)), np.float64)
    if not len(flat):
        return out
    desc = -np.sort(-flat, axis=1)  # one sort serves every fraction
    csum = np.cumsum(desc, axis=1, dtype=np.float64)
    for s, top in enumerate(tops):
        k = max(1, int(round(top * flat.shape[1])))
        out[:, s] = csum[:, k - 1] / k
    return out


@dataclass(frozen=True)
class ImageScore:
    """Maps ``(N, H, W)`` -> image scores ``(N,)``. ``centre`` and ``scale`` (one per entry of
    ``tops``) are the held-back normal images' median and MAD-based spread of each top mean;
    ``None``: no reference (the score is the mean of the top means)."""

    tops: tuple[float, ...]
    centre: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None

    @classmethod
    def fit(cls, tops, reference: np.ndarray) -> "ImageScore":
        """The score of ``tops`` standardised on ``reference``, the top means ``(H, S)`` of the
        held-back normal images (:func:`top_means`). Fewer than three images (each must be
        scored on at least two others), or a top mean with no spread over them, give no
        reference."""
        tops = tuple(float(t) for t in tops)
        ref = np.asarray(reference, np.float64).reshape(-1, len(tops))
        if len(ref) < 3:
            return cls(tops)
        centre = np.median(ref, axis=0)
        scale = MAD_TO_SD * np.median(np.abs(ref - centre), axis=0)
        if not np.all(scale > 0):
            return cls(tops)
        return cls(tops, tuple(centre.tolist()), tuple(scale.tolist()))

    @property
    def standardised(self) -> bool:
        return self.centre is not None

    def of_top_means(self, means: np.ndarray) -> np.ndarray:
        """float64 ``(N,)`` from top means ``(N, S)``."""
        means = np.asarray(means, np.float64).reshape(-1, len(self.tops))
        if not self.standardised:
            return means.mean(axis=1)
        return ((means - np.asarray(self.centre)) / np.asarray(self.scale)).max(axis=1)

    def reference_scores(self, reference: np.ndarray) -> np.ndarray:
        """float64 ``(H,)``: the scores of the reference images this score was fitted on
        (``reference``: their top means ``(H, S)``), each standardised on the other ``H - 1``
        (on all ``H`` where the others have no spread)."""
        ref = np.asarray(reference, np.float64).reshape(-1, len(self.tops))
        if not self.standardised:
            return self.of_top_means(ref)
        out = np.empty(len(ref))
        for i in range(len(ref)):
            others = ImageScore.fit(self.tops, np.delete(ref, i, axis=0))
            out[i] = (others if others.standardised else self).of_top_means(ref[i : i + 1])[0]
        return out

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """float32 ``(N,)``: the scores of maps ``(N, H, W)``."""
        return self.of_top_means(top_means(maps, self.tops)).astype(np.float32)

    def to_attrs(self) -> dict:
        return {
            "tops": list(self.tops),
            "centre": None if self.centre is None else list(self.centre),
            "scale": None if self.scale is None else list(self.scale),
        }

    @classmethod
    def from_attrs(cls, attrs: dict, where: str = "maps store") -> "ImageScore":
        """From a maps store's attrs: ``image_score`` as :meth:`to_attrs` wrote it, or, for a
        store from before it, the single ``params.score_top`` it was scored with. Attrs that are
        not such a score: an :class:`~anomalyncd.io.InputError` naming ``where``."""
        d = attrs.get("image_score")
        try:
            if d is None:
                return cls((float((attrs.get("params") or {}).get("score_top", 0.01)),))
            tops = tuple(float(t) for t in d["tops"])
            centre, scale = (None if d.get(k) is None else tuple(float(v) for v in d[k]) for k in ("centre", "scale"))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: damaged image_score attrs ({type(e).__name__}: {e}); rerun detect (dvc repro detect)") from e
        if not tops or (centre is None) != (scale is None) or (
            centre is not None and (len(centre) != len(tops) or len(scale) != len(tops) or min(scale) <= 0)
        ):
            raise InputError(f"{where}: damaged image_score attrs {d}; rerun detect (dvc repro detect)")
        return cls(tops, centre, scale)
