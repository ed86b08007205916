"""The frozen-feature baseline: k-means on the backbone's mask-pooled features of the crops.

Every run reports it beside the trained model (``metrics/evaluate.json``, ``baseline``), so
the figures show what mask-guided training adds over clustering the pretrained features of
the same crops. Features are standardised per channel, reduced by PCA to at most
``PCA_DIMS`` dimensions, clustered by k-means (``n_init`` 10, seeded) into the same number of
classes as the model has novel outputs, and merged to images like the model's predictions;
``evaluate`` reports the mean over several k-means seeds, since one run can land in a
partition some hundredths of NMI from another's.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

PCA_DIMS = 64


def kmeans_clusters(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster id int64 (M,) of each row of ``features`` float (M, D) into ``k`` clusters."""
    x = np.asarray(features, dtype=np.float64)
    k = min(k, len(x))
    if k <= 1:
        return np.zeros(len(x), np.int64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    dims = min(PCA_DIMS, x.shape[1], len(x) - 1)
    x = PCA(dims, random_state=seed).fit_transform(x)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)
