"""Normal training images held back from the detector's fit, to calibrate the normal/defect
decision of ``anomalyncd predict`` on images the detector has not seen.

A detector scores the images it was fitted on lower than new normal images (PatchCore's memory
bank holds their very patches), so a threshold taken on them would flag too many new normal
images. ``detect.holdout`` sets the share held back; the ``detect`` stage scores them after the
fit and stores their image scores with the maps (``holdout_scores``); :mod:`anomalyncd.calibrate`
turns them into a threshold.
"""

from __future__ import annotations

import numpy as np


def split_holdout(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, held)`` of ``n`` normal training images, each sorted: ``round(share * n)``
    images drawn with ``seed`` are held back, at least one when ``share > 0`` and ``n >= 2``,
    and at least one is always left to fit on."""
    if not 0 <= share < 1:
        raise ValueError(f"holdout share must be in [0, 1), got {share}")
    n_held = int(round(share * n))
    if share > 0 and n >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_held:]), np.sort(order[:n_held])
