"""The detector interface, the registry, and saving/loading a fitted detector.

A detector turns images (or, for ``external`` and ``ground_truth``, manifest records) into
raw float anomaly maps ``(N, S, S)``. The ``detect`` stage fits it, maps the images, and saves
it with the global normalisation range so that ``load_detector(path).predict(images)`` maps
new images the same way later.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..config import DetectParams
from ..datasets import Record, set_bits
from ..io import InputError, load_torch, read_image, save_torch

DETECTORS: dict[str, type["Detector"]] = {}


def register(name: str) -> Callable[[type["Detector"]], type["Detector"]]:
    def deco(cls: type[Detector]) -> type[Detector]:
        cls.method = name
        DETECTORS[name] = cls
        return cls

    return deco


class LazyImages(Sequence[np.ndarray]):
    """Images read from their files on access, so a large set is never all in memory; 16-bit
    ones scaled from ``bits`` significant bits (:func:`anomalyncd.io.read_image`)."""

    def __init__(self, paths: Sequence[str], bits: int = 16) -> None:
        self.paths = list(paths)
        self.bits = bits

    @classmethod
    def of(cls, records: Sequence[Record]) -> "LazyImages":
        """The images of manifest records, read as :meth:`Record.read` reads them."""
        return cls([r.image for r in records], set_bits(records))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [read_image(p, self.bits) for p in self.paths[i]]
        return read_image(self.paths[i], self.bits)


@dataclass
class DetectContext:
    """What a detector may need besides the images: the dataset root (``external`` matches
    map files by the image's path under it)."""

    dataset_root: str = ""


class Detector(ABC):
    """Base class. ``fit`` on normal images (no-op for detectors that need none), ``predict``
    raw maps float32 ``(N, S, S)`` of RGB ``uint8`` images ``(H_i, W_i, 3)``."""

    method: ClassVar[str] = ""
    needs_training_images: ClassVar[bool] = False
    #: The maps of a set depend on the whole set (MuSc's images score each other; external maps
    #: are matched to images one to one): mapped in one call, by one process.
    maps_jointly: ClassVar[bool] = False
    pretrained: bool = False  # recorded in the maps store and metrics
    weights: str = "none"  # how backbone weights were obtained, for logs and metrics

    # Global normalisation of the run that fitted it (set by the stage before saving).
    norm_min: float = 0.0
    norm_max: float = 1.0

    def __init__(self, params: DetectParams, context: DetectContext | None = None) -> None:
        self.params = params
        self.context = context or DetectContext()

    def fit(self, images: Sequence[np.ndarray]) -> None:
        """Learn from normal images ``(H_i, W_i, 3)`` uint8. Default: nothing to learn."""

    @abstractmethod
    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw anomaly maps float32 ``(N, map_size, map_size)``."""

    def predict_scored(
        self, images: Sequence[np.ndarray], wanted: Callable[[np.ndarray], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The maps of :meth:`predict` and the maps the image score is drawn from, both float32
        ``(N, map_size, map_size)`` and aligned with the images. Default: the same maps; a
        detector whose best localisation and best image score come from different features
        (PatchCore with several ``scales``) returns two, and there ``wanted(a batch's score maps
        (B, S, S)) -> False`` skips that batch's region maps (left zeros): images that are only
        scored, or that their score already calls normal."""
        maps = self.predict(images)
        return maps, maps

    @property
    def residual_dim(self) -> int:
        """Dims of a :meth:`residuals` grid's cells; 0: this detector gives none (no memory bank
        of normal patches)."""
        return 0

    def residuals(self, image: np.ndarray) -> np.ndarray:
        """float32 ``(h, w, residual_dim)`` for one RGB uint8 image: each patch's features minus
        those of its nearest normal patch (:mod:`anomalyncd.residual`); only detectors with a
        memory bank give them."""
        raise InputError(f"detect.method {self.method}: no memory bank of normal patches, so no residual descriptors")

    def check_records(self, records: Sequence[Record]) -> None:
        """Raise ``InputError`` if this detector cannot map the set ``records`` (checked on the
        whole set, before it is mapped a chunk at a time). Default: any images will do."""

    def map_records(self, records: Sequence[Record]) -> np.ndarray:
        """Maps of manifest records (default: read their images and :meth:`predict`)."""
        return self.predict(LazyImages.of(records))

    def map_records_scored(
        self, records: Sequence[Record], wanted: Callable[[np.ndarray], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_scored` of manifest records (a detector that overrides
        :meth:`map_records`: its maps twice)."""
        if type(self).map_records is not Detector.map_records:
            maps = self.map_records(records)
            return maps, maps
        return self.predict_scored(LazyImages.of(records), wanted)

    def state_dict(self) -> dict[str, Any]:
        """Fitted state beyond ``params`` (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def to_u8(self, maps: np.ndarray) -> np.ndarray:
        """Maps float ``(N, S, S)`` -> uint8 0..255 with the fitted run's global range."""
        return normalise_u8(maps, self.norm_min, self.norm_max)


def normalise_u8(maps: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max ``maps`` (any shape) from ``[lo, hi]`` to uint8 0..255, clipping outside (any
    positive range, however small: maps in units of 1e-15 are maps too)."""
    scaled = (np.asarray(maps, dtype=np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def create_detector(params: DetectParams, context: DetectContext | None = None) -> Detector:
    """A new detector for ``params.method``."""
    if params.method not in DETECTORS:
        raise InputError(f"params.yaml: detect.method {params.method!r} unknown; use one of {sorted(DETECTORS)}")
    return DETECTORS[params.method](params, context)


def save_detector(det: Detector, path: str | os.PathLike) -> None:
    """Save a fitted detector (method, params, state, normalisation range) atomically."""
    from dataclasses import asdict

    blob = {
        "format": 1,
        "method": det.method,
        "params": asdict(det.params),
        "context": asdict(det.context),
        "norm_min": float(det.norm_min),
        "norm_max": float(det.norm_max),
        "state": det.state_dict(),
    }
    save_torch(blob, path)


def load_detector(path: str | os.PathLike, device: str | None = None) -> Detector:
    """Rebuild the detector saved by the ``detect`` stage, ready to ``predict`` new images.

    ``device`` overrides the saved ``detect.device`` (e.g. ``"cpu"``).
    """
    from ..config import REPLACED, from_dict

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: detector not found; run the detect stage first (dvc repro detect)")
    fix = "rerun the detect stage (dvc repro detect)"
    blob = load_torch(path, fix)
    try:
        # files written before detect.grid_layer and detect.scales: one scale, the first layer's grid;
        # keys a later version replaced (detect.score_top) never changed the detector: dropped
        saved = {k: v for k, v in blob["params"].items() if ("DetectParams", k) not in REPLACED}
        params = from_dict(DetectParams, {"grid_layer": 0, "scales": [1.0], **saved}, where=f"{path}: params")
        if device is not None:
            params.device = device
        det = create_detector(params, DetectContext(**blob.get("context", {})))
        det.load_state_dict(blob["state"])
        det.norm_min, det.norm_max = float(blob["norm_min"]), float(blob["norm_max"])
    except InputError:
        raise
    except KeyError as e:
        raise InputError(f"{path}: damaged (no {e} in it); {fix}") from e
    except (TypeError, AttributeError, ValueError) as e:
        raise InputError(f"{path}: damaged ({type(e).__name__}: {e}); {fix}") from e
    return det
