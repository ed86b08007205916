"""The number-of-classes estimators on synthetic feature blobs with known cluster counts."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyncd.num_classes import (
    METHODS,
    KEstimate,
    count_massive_classes,
    estimate_num_classes,
    prepare_features,
)


def blobs(sizes: list[int], d: int = 48, seed: int = 0, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs sharing a large common component, like ViT [CLS] features.

    Returns features float (sum(sizes), d) and their blob labels.
    """
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d) * 3
    xs, ys = [], []
    for i, n in enumerate(sizes):
        centre = rng.normal(size=d)
        centre *= 0.5 * np.sqrt(d) / np.linalg.norm(centre)
        xs.append(common + centre + spread * rng.normal(size=(n, d)))
        ys += [i] * n
    return np.concatenate(xs).astype(np.float32), np.array(ys)


@pytest.mark.parametrize("method", METHODS)
def test_one_blob_is_one_class(method):
    x, _ = blobs([80])
    assert estimate_num_classes(x, k_max=8, method=method, seed=0).k == 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 4, 6])
def test_equal_blobs_give_their_count(method, n):
    x, _ = blobs([30] * n, seed=n)
    assert estimate_num_classes(x, k_max=8, method=method, seed=0).k == n


@pytest.mark.parametrize("sizes", [[60, 30, 15, 8], [80, 20, 20, 10, 10]])
def test_unequal_blobs_give_their_count(sizes):
    x, _ = blobs(sizes, seed=1)
    for method in ("bic", "eigengap", "silhouette"):
        assert estimate_num_classes(x, k_max=8, method=method, seed=0).k == len(sizes), method


def test_estimate_holds_a_score_per_candidate():
    x, _ = blobs([30, 30, 30])
    est = estimate_num_classes(x, k_max=7, method="eigengap", seed=0)
    assert isinstance(est, KEstimate)
    assert est.candidates == list(range(1, 8))
    assert len(est.scores) == 7
    assert est.k == est.candidates[int(np.argmax(est.scores))]
    assert est.method == "eigengap"


def test_silhouette_and_stability_are_undefined_for_one_class():
    x, _ = blobs([30, 30])
    for method in ("silhouette", "stability"):
        est = estimate_num_classes(x, k_max=4, method=method, seed=0)
        assert np.isnan(est.scores[0])
        assert est.to_dict()["scores"][0] is None


def test_k_max_is_clamped_to_the_number_of_points():
    x, _ = blobs([3, 3])
    est = estimate_num_classes(x, k_max=10, method="eigengap", seed=0)
    assert est.candidates == list(range(1, 6))


def test_same_seed_same_estimate():
    x, _ = blobs([40, 25, 10], seed=3)
    a = estimate_num_classes(x, k_max=6, method="stability", seed=5)
    b = estimate_num_classes(x, k_max=6, method="stability", seed=5)
    assert a.to_dict() == b.to_dict()


def test_bad_features_are_errors():
    with pytest.raises(ValueError, match="2-D"):
        estimate_num_classes(np.zeros(5), k_max=4, method="bic", seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        estimate_num_classes(np.zeros((1, 4)), k_max=4, method="bic", seed=0)
    with pytest.raises(ValueError, match="NaN"):
        estimate_num_classes(np.full((4, 4), np.nan), k_max=4, method="bic", seed=0)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_num_classes(np.ones((4, 4)), k_max=4, method="elbow", seed=0)


def test_prepare_features_shape_and_unit_scale():
    x, _ = blobs([20, 20], d=48)
    z = prepare_features(x * 100.0, n_components=16)
    assert z.shape == (40, 16)
    np.testing.assert_allclose(z, prepare_features(x, n_components=16), atol=1e-5)


def test_count_massive_classes_ignores_near_empty_outputs():
    probs = np.zeros((100, 6))
    probs[:50, 0] = 1
    probs[50:90, 2] = 1
    probs[90:99, 4] = 1
    probs[99, 5] = 1  # a single crop: not real mass
    assert count_massive_classes(probs, min_fraction=0.02) == 3


@pytest.mark.parametrize("method", METHODS)
def test_identical_features_are_one_class(method):
    x = np.tile(np.arange(8, dtype=np.float32), (20, 1))
    assert estimate_num_classes(x, k_max=5, method=method, seed=0).k == 1


def test_silhouette_floor_turns_weak_structure_into_one_class():
    x, _ = blobs([30, 30, 30])
    assert estimate_num_classes(x, k_max=5, method="silhouette", min_silhouette=0.99, seed=0).k == 1


def test_bic_counts_clusters_of_different_shapes():
    """Elongated clusters at right angles and a round one: full covariances, not extra clusters."""
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(60, d)) * 0.05
    a[:, 0] *= 40  # long along axis 0
    b = rng.normal(size=(50, d)) * 0.05
    b[:, 1] *= 40  # long along axis 1
    c = rng.normal(size=(25, d)) * 0.05
    x = np.concatenate([a + 6 * np.eye(d)[2], b - 6 * np.eye(d)[2], c + 6 * np.eye(d)[3]]) + 10 * np.eye(d)[4]
    assert estimate_num_classes(x, k_max=8, method="bic", seed=0).k == 3
