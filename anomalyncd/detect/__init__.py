"""Anomaly detectors behind one registry, chosen by ``detect.method``.

- ``patchcore``: memory bank of normal patch features, nearest-neighbour distance.
- ``padim``: a Gaussian of normal patch features at every position, Mahalanobis distance.
- ``musc``: zero-shot, the images to map score each other.
- ``external``: maps made by another tool, read from files.
- ``ground_truth``: maps made from the dataset's own masks.

Backbones (``detect.backbone``) are timm models by name or the weight-free ``filterbank``.
"""

from . import external, ground_truth, musc, padim, patchcore  # noqa: F401  (register the detectors)
from .base import (
    DETECTORS,
    DetectContext,
    Detector,
    LazyImages,
    create_detector,
    load_detector,
    normalise_u8,
    save_detector,
)

__all__ = [
    "DETECTORS",
    "DetectContext",
    "Detector",
    "LazyImages",
    "create_detector",
    "load_detector",
    "normalise_u8",
    "save_detector",
]
