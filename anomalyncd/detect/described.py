"""Maps made elsewhere, described by a memory bank of the set's own normal patches.

``external`` and ``ground_truth`` copy their maps from files; the residual descriptors the
classifier reads beside each crop (:mod:`anomalyncd.residual`) need a memory bank of normal
patches, which such maps do not come with. Fitted on the set's normal images, when it has any,
these detectors keep a PatchCore for the descriptors alone: the maps, the regions and the image
score stay those of the files. The reason holds for any data: the descriptor says how a region
differs from the normal surface, whoever drew the region.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .base import Detector


class DescribedMaps(Detector):
    """Base of the detectors whose maps come from elsewhere; ``describer`` is the PatchCore
    fitted on the normal images (None without any: no descriptors then)."""

    def __init__(self, params, context=None) -> None:
        super().__init__(params, context)
        self.describer = None

    def fit(self, images: Sequence[np.ndarray]) -> None:
        from .patchcore import PatchCore

        self.describer = PatchCore(self._describer_params(), self.context)
        self.describer.fit(images)

    def _describer_params(self):
        """The describer's params: the descriptors read the region map's bank alone, so the
        coreset stops at ``bank_size`` (no bank for an image score: the files' maps make it)."""
        return replace(self.params, score_bank_size=0)

    @property
    def residual_dim(self) -> int:
        return 0 if self.describer is None else self.describer.residual_dim

    def residuals(self, image: np.ndarray) -> np.ndarray:
        if self.describer is None:
            return super().residuals(image)
        return self.describer.residuals(image)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.describer is None else {"describer": self.describer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .patchcore import PatchCore

        self.describer = None
        if "describer" in state:
            self.describer = PatchCore(self._describer_params(), self.context)
            self.describer.load_state_dict(state["describer"])
