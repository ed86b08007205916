"""Maps made from the dataset's own masks.

For ablations that isolate the classifier from detection errors, and for users who marked the
defective regions by hand (any mask image the dataset reader finds, boxes drawn as filled
rectangles included). Each mask is resized to the map size and blurred slightly (sigma = 1 %
of the map size) so the binarisation downstream sees a smooth plateau rather than a step;
images without a mask (defect-free ones) get an all-zero map.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..datasets import Record
from ..io import InputError, read_mask
from .base import register
from .described import DescribedMaps

BLUR_FRACTION = 0.01


def mask_map(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool mask ``(H, W)`` -> float32 map ``(size, size)`` in [0, 1], slightly blurred."""
    m = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(m, (0, 0), max(0.5, BLUR_FRACTION * size))


@register("ground_truth")
class GroundTruth(DescribedMaps):
    weights = "ground-truth masks"

    def check_records(self, records: Sequence[Record]) -> None:
        if not any(r.mask for r in records):
            raise InputError(
                "detect.method ground_truth needs ground-truth masks, but no image to map has one; "
                "use a dataset with masks or another detect.method"
            )

    def map_records(self, records: Sequence[Record]) -> np.ndarray:
        """Maps of ``records``; a chunk of images without masks (defect-free ones) is all zero."""
        size = self.params.map_size
        out = np.zeros((len(records), size, size), dtype=np.float32)
        for i, r in enumerate(records):
            if r.mask:
                out[i] = mask_map(read_mask(r.mask), size)
        return out

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise InputError(
            "a ground_truth detector copies the dataset's masks and cannot map new images; "
            "run detect with patchcore or musc to map new images"
        )
