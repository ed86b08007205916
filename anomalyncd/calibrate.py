"""Calibration of ``anomalyncd predict``'s two decisions, and the decisions themselves.

1. **Normal or defect.** An image is anomalous when the detector's image score (its map's top
   means at ``detect.score_tops``, standardised on the held-back normal images, the largest:
   :mod:`anomalyncd.image_score`) is above the ``normal_quantile`` of the scores of the normal
   training images ``detect`` held back from the fit (``detect.holdout``,
   :mod:`anomalyncd.detect.holdout`): about ``1 - normal_quantile`` of new normal images are
   flagged. Detectors that fit on no normal images (``musc``, ``external``, ``ground_truth``)
   leave no held-back scores: the decision is then off (every image goes on to MEBin, as before)
   and :attr:`Calibration.note` says why.
2. **Known or unknown type.** A crop's unknown score is its cosine distance to the nearest class
   prototype: the unit weight row of that class in the classifier's selected cosine head, the
   direction its logit measures the crop's feature (the encoder's output) against. An image's
   score is the merge-weighted mean over its crops (:func:`anomalyncd.merge.region_weights`).
   An anomalous image is of an unknown type when its score is above the ``unknown_quantile`` of
   the run's own anomalous images' scores. The head was trained on those images, so they lie a
   little nearer their classes than new images of the same types: the threshold flags somewhat
   more than ``1 - unknown_quantile`` of new known-type images.

The ``calibrate`` stage stores what both need in ``models/calibration.json`` (the score
distributions, not only the thresholds, so that ``predict --normal-quantile/--unknown-quantile``
can move a threshold without a rerun). Pure functions on arrays; the stage does the I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .io import InputError

FORMAT = "anomalyncd-calibration-1"
#: ``open_set`` values of an anomalous image in predict's rows
KNOWN, UNKNOWN = "known type", "unknown type"


def threshold(scores: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``scores`` (N,) (linear interpolation; NaN for no scores)."""
    scores = np.asarray(scores, np.float64)
    return float(np.quantile(scores, q)) if len(scores) else math.nan


def class_prototypes(head_weight: np.ndarray, num_labeled: int, crop_labels: np.ndarray) -> np.ndarray:
    """float32 (K, D): the unit rows of the selected head's weights ``head_weight`` (num_labeled
    + K, D) for the K novel classes (the base classes' rows, first, dropped), the directions its
    cosine logits compare a crop's feature with; NaN rows for a class that none of the run's
    crops (``crop_labels`` (M,), in 0..K-1; others ignored) belongs to: no known type."""
    w = _unit(np.asarray(head_weight, np.float64)[num_labeled:])
    labels = np.asarray(crop_labels, np.int64).reshape(-1)
    held = np.bincount(labels[(labels >= 0) & (labels < len(w))], minlength=len(w)) > 0
    return np.where(held[:, None], w, np.nan).astype(np.float32)


def crop_distances(features: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each crop's cosine distance ``1 - cos`` to the nearest prototype and that class:
    features (M, D), prototypes (K, D) (NaN rows skipped) -> float64 (M,), int64 (M,)."""
    f = _unit(np.asarray(features, np.float64))
    p = np.asarray(prototypes, np.float64)
    ok = np.isfinite(p).all(1)
    if not ok.any():
        raise ValueError("no class has a prototype (no crop with an anomaly region in the run)")
    cos = f @ np.where(ok[:, None], p, 0.0).T
    cos[:, ~ok] = -np.inf
    nearest = np.argmax(cos, 1) if len(f) else np.zeros(0, np.int64)
    return 1.0 - cos[np.arange(len(f)), nearest], nearest.astype(np.int64)


def image_unknown_scores(
    crop_scores: np.ndarray, weights: np.ndarray, image_index: np.ndarray, anomaly: np.ndarray
) -> np.ndarray:
    """float64 (N,): each anomalous image's merge-weighted mean of its crops' scores; NaN for an
    image without anomaly. crop_scores, weights (summing to 1 per image), image_index: (M,);
    anomaly: bool (N,)."""
    anomaly = np.asarray(anomaly, bool)
    out = np.zeros(len(anomaly))
    np.add.at(out, np.asarray(image_index, np.int64), np.asarray(weights) * np.asarray(crop_scores))
    out[~anomaly] = np.nan
    return out


@dataclass
class Calibration:
    """What predict's decisions need from a run (``models/calibration.json``).

    normal_scores: float (H,) the held-back normal images' image scores (empty: the decision is
    off, :attr:`note` says why); image_score: how the run's image score is made (the maps
    store's ``image_score`` attrs: its top fractions and their normal reference); prototypes:
    float (K, D) unit rows (NaN for a class without crops);
    known_scores: float (N,) the run's own anomalous images' unknown scores; the two quantiles
    (``calibrate`` params, or predict's overrides).
    """

    image_score: dict
    normal_scores: np.ndarray
    prototypes: np.ndarray
    known_scores: np.ndarray
    normal_quantile: float
    unknown_quantile: float
    note: str = ""
    method: str = ""  # detect.method of the run
    extra: dict = field(default_factory=dict)

    @property
    def normal_threshold(self) -> float | None:
        """Image scores above it are anomalous; None when not calibrated."""
        return threshold(self.normal_scores, self.normal_quantile) if len(self.normal_scores) else None

    @property
    def unknown_threshold(self) -> float | None:
        """Unknown scores above it are an unknown type; None without known scores."""
        return threshold(self.known_scores, self.unknown_quantile) if len(self.known_scores) else None

    def with_quantiles(self, normal: float | None = None, unknown: float | None = None) -> "Calibration":
        """A copy with the given quantiles (None keeps the run's)."""
        for name, q in (("--normal-quantile", normal), ("--unknown-quantile", unknown)):
            if q is not None and not 0 <= q <= 1:
                raise InputError(f"{name} must be in [0, 1], got {q}")
        return dataclasses.replace(
            self,
            normal_quantile=self.normal_quantile if normal is None else float(normal),
            unknown_quantile=self.unknown_quantile if unknown is None else float(unknown),
        )

    def to_dict(self) -> dict:
        """Plain JSON values (NaN prototypes rows as null)."""
        return {
            "format": FORMAT,
            "method": self.method,
            "normal": {
                "quantile": self.normal_quantile,
                "threshold": self.normal_threshold,
                "image_score": self.image_score,
                "holdout_images": len(self.normal_scores),
                "note": self.note,
                "scores": [float(s) for s in self.normal_scores],
            },
            "unknown": {
                "quantile": self.unknown_quantile,
                "threshold": self.unknown_threshold,
                "images": len(self.known_scores),
                "scores": [float(s) for s in self.known_scores],
                "prototypes": [None if not np.isfinite(r).all() else [float(v) for v in r] for r in self.prototypes],
            },
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Calibration":
        fix = "rerun the calibrate stage (dvc repro calibrate)"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"{where}: not a calibration file of this version ({FORMAT}); {fix}")
        try:
            n, u = d["normal"], d["unknown"]
            protos = u["prototypes"]
            dim = next((len(r) for r in protos if r is not None), 0)
            return cls(
                image_score=dict(n.get("image_score") or {}),
                normal_scores=np.asarray(n["scores"], np.float64).reshape(-1),
                prototypes=np.array([[math.nan] * dim if r is None else r for r in protos], np.float64).reshape(len(protos), dim),
                known_scores=np.asarray(u["scores"], np.float64).reshape(-1),
                normal_quantile=float(n["quantile"]),
                unknown_quantile=float(u["quantile"]),
                note=str(n.get("note", "")),
                method=str(d.get("method", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: damaged ({type(e).__name__}: {e}); {fix}") from e


def no_normal_calibration(method: str, holdout: float) -> str:
    """Why a run has no normal/defect threshold, in a line predict prints."""
    if method in ("musc", "external", "ground_truth"):
        return (f"detect.method {method} scores images without a model of normal ones, so none were held back to calibrate on; "
                "every image goes on to the defect classifier")
    return f"detect.holdout is {holdout:g}: no normal images were held back; every image goes on to the defect classifier"


def calibrate(
    holdout_scores: np.ndarray,
    image_score: dict,
    features: np.ndarray,
    prototypes: np.ndarray,
    weights: np.ndarray,
    image_index: np.ndarray,
    anomaly: np.ndarray,
    normal_quantile: float,
    unknown_quantile: float,
    method: str = "",
    note: str = "",
) -> Calibration:
    """The calibration of a finished run: the held-back normal images' scores (H,), and the
    unknown scores of its images against ``prototypes`` (K, D) (:func:`class_prototypes`),
    from its crops' features (M, D), merge weights and image_index (M,); anomaly: bool (N,)."""
    protos = np.asarray(prototypes, np.float32)
    if np.isfinite(protos).all(1).any():
        img = image_unknown_scores(crop_distances(features, protos)[0], weights, image_index, anomaly)
        known = np.sort(img[np.isfinite(img)])
    else:  # no anomaly region in the whole run: nothing to compare with
        known = np.zeros(0)
    return Calibration(
        image_score=dict(image_score),
        normal_scores=np.sort(np.asarray(holdout_scores, np.float64).reshape(-1)),
        prototypes=protos,
        known_scores=known,
        normal_quantile=normal_quantile,
        unknown_quantile=unknown_quantile,
        note=note,
        method=method,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
