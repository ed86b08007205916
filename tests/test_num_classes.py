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
    # so are copies of one row that differ by rounding, or are scaled (one point on the sphere)
    jitter = np.random.default_rng(0).normal(0, 1e-12, x.shape)
    assert estimate_num_classes(x + jitter, k_max=5, method=method, seed=0).k == 1
    assert estimate_num_classes(x * np.arange(1, 21)[:, None], k_max=5, method=method, seed=0).k == 1


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


# -- null-corrected stability on the synthetic bench (benchmarks/synthetic_k.py) --------------

from benchmarks.synthetic_k import CASES, Case, mixture  # noqa: E402
from anomalyncd.num_classes import null_reference, null_stability_scores, pick_null_stability  # noqa: E402


def test_the_synthetic_bench_has_the_cases_the_estimate_must_survive():
    names = {c.name: c for c in CASES}
    assert names["none, round"].k == names["none, elongated"].k == 1
    small = names["5, one of 5 %"]
    assert min(small.sizes) / sum(small.sizes) == pytest.approx(0.05)
    assert len(set(names["4 unequal"].sizes)) == 4
    assert names["4 overlapping"].separation < names["4 unequal"].separation


def test_a_synthetic_set_has_its_sizes_labels_and_separation():
    case = Case("t", (30, 20, 10), separation=5.0)
    x, y = mixture(case, seed=3)
    assert x.shape == (60, 64) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [30, 20, 10]
    np.testing.assert_array_equal(mixture(case, seed=3)[0], x)  # deterministic
    centres = np.stack([x[y == c].mean(0) for c in range(3)])
    closest = min(np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3))
    assert 3.5 < closest < 6.5  # 5 noise sd apart, up to the sample means' error


def test_a_null_reference_keeps_the_covariance_and_loses_the_clusters():
    x, _ = mixture(Case("t", (100, 100), separation=8.0), seed=0)
    ref = null_reference(x, np.random.default_rng(0))
    assert ref.shape == x.shape
    np.testing.assert_allclose(ref.mean(0), x.mean(0), atol=0.5)
    assert np.trace(np.cov(ref.T)) == pytest.approx(np.trace(np.cov(x.T)), rel=0.2)
    lead = lambda z: prepare_features(z, 1)[:, 0]  # noqa: E731
    gap = lambda v: np.sort(v)[100] - np.sort(v)[99]  # noqa: E731, the widest cut in the middle
    assert gap(lead(x)) > 5 * gap(lead(ref))  # two modes in the data, one in the reference


@pytest.mark.parametrize("name", ["none, round", "none, elongated"])
def test_null_stability_recognises_no_structure(name):
    case = next(c for c in CASES if c.name == name)
    x, _ = mixture(Case(name, (150,), decay=case.decay), seed=0)
    est = estimate_num_classes(x, k_max=6, method="null_stability", seed=0)
    assert est.k == 1 and est.scores[0] == 0.0


@pytest.mark.parametrize("sizes", [(60, 60, 60), (120, 60, 30, 15), (76, 76, 76, 76, 16)])
def test_null_stability_counts_equal_unequal_and_small_classes(sizes):
    x, _ = mixture(Case("t", sizes), seed=0)
    est = estimate_num_classes(x, k_max=8, method="null_stability", seed=0)
    assert abs(est.k - len(sizes)) <= 1


def test_null_stability_holds_on_overlapping_classes():
    x, _ = mixture(Case("t", (80,) * 4, separation=4.0), seed=0)
    assert abs(estimate_num_classes(x, k_max=8, method="null_stability", seed=0).k - 4) <= 1


def test_an_estimate_carries_its_runner_up_and_its_confidence():
    x, _ = mixture(Case("t", (60, 60, 60), separation=8.0), seed=1)
    est = estimate_num_classes(x, k_max=6, method="null_stability", seed=0)
    assert est.k == 3 and est.runner_up not in (None, 3)
    assert est.confidence >= 0.9  # well-separated classes: nearly every resampling agrees
    d = est.to_dict()
    assert (d["runner_up"], d["confidence"]) == (est.runner_up, est.confidence)
    other = estimate_num_classes(x, k_max=6, method="eigengap", seed=0)
    assert other.runner_up not in (None, other.k) and other.confidence is None


def test_pick_null_stability_needs_an_excess_above_the_references_spread():
    from anomalyncd.num_classes import NullStability

    split = np.array([[0.0, 0.3, 0.1], [0.0, 0.1, 0.2], [0.0, 0.2, 0.0]])
    ns = NullStability(excess=np.array([0.0, 0.2, 0.1]), null_sd=np.array([0.0, 0.05, 0.01]), split_excess=split)
    assert pick_null_stability(ns, null_z=2.0) == (2, 3, pytest.approx(2 / 3))
    assert pick_null_stability(ns, null_z=5.0)[0] == 3  # K = 2's excess is within 5 sd of the references: K = 3 (10 sd)
    assert pick_null_stability(ns, null_z=20.0)[:2] == (1, 2)  # nothing significant: no structure


def test_null_stability_is_deterministic_for_a_seed():
    x, _ = mixture(Case("t", (40, 30, 20)), seed=2)
    a = null_stability_scores(x, 5, seed=4)
    b = null_stability_scores(x, 5, seed=4)
    np.testing.assert_array_equal(a.excess, b.excess)
    np.testing.assert_array_equal(a.split_excess, b.split_excess)


def test_the_significance_grows_with_the_ks_tested_and_shrinks_with_the_references():
    from anomalyncd.num_classes import significance_z

    assert significance_z(10, 9) > significance_z(10, 1) > 1.64  # Bonferroni over the Ks; t above the normal
    assert significance_z(5, 9) > significance_z(10, 9) > significance_z(100, 9)


# -- consensus: null stability says whether, the eigengap says how many ------------------------

from anomalyncd.num_classes import consensus_estimate  # noqa: E402


def test_consensus_with_structure_takes_the_largest_eigengap_beyond_one():
    z = prepare_features(blobs([40, 40, 40], seed=2)[0])
    est = consensus_estimate(z, 6, structure=True, seed=0)
    assert est.k == 3 and np.isnan(est.scores[0])  # K = 1 is not a candidate once structure is found
    assert est.runner_up not in (None, 1, 3) and 0.0 <= est.confidence <= 1.0
    assert est.confidence >= 0.9  # well-separated blobs: every subset agrees


def test_consensus_without_structure_is_one_class_and_names_the_best_split():
    z = prepare_features(blobs([40, 40, 40], seed=2)[0])
    est = consensus_estimate(z, 6, structure=False, seed=0)
    assert (est.k, est.runner_up) == (1, 3)


@pytest.mark.parametrize("name", ["none, elongated", "4 unequal", "5, one of 5 %", "4 overlapping"])
def test_consensus_on_the_synthetic_bench(name):
    case = next(c for c in CASES if c.name == name)
    x = mixture(case, seed=0)[0]
    est = estimate_num_classes(x, k_max=8, method="consensus", seed=0)
    assert (est.k == 1) if case.k == 1 else (abs(est.k - case.k) <= 1)
    assert est.to_dict() == estimate_num_classes(x, k_max=8, method="consensus", seed=0).to_dict()  # deterministic


@pytest.mark.parametrize("name", ["none, round", "3 equal", "4 overlapping"])
def test_the_early_stopping_structure_test_answers_as_null_stability(name):
    from anomalyncd.num_classes import has_structure, significance_z

    x = mixture(next(c for c in CASES if c.name == name), seed=1)[0][::2]
    full = pick_null_stability(null_stability_scores(x, 6, seed=3), significance_z(10, 5))[0] > 1
    assert has_structure(x, 6, seed=3) == full == (name != "none, round")
