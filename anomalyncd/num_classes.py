"""Estimate how many classes a set of features holds (``train.num_classes: auto``).

Class discovery papers are told the number of novel classes; a factory does not know it. The
functions here choose it from the crops' [CLS] features alone.
Every estimator scores each candidate K in ``1..k_max`` (higher is better, ``nan`` where a
score is undefined) and returns a :class:`KEstimate` holding the evidence, so that the pipeline
can log it and plot score against K.

Estimators (``method``):

- ``eigengap``: spectral gap of a k-nearest-neighbour affinity graph
  with local scaling (Zelnik-Manor & Perona, 2004). Score of K is ``lambda_{K+1} - lambda_K``
  of the normalised Laplacian; one cluster is a first-class answer (a large gap after
  ``lambda_1 = 0``).
- ``bic``: Bayesian information criterion of a Gaussian mixture with K components on the
  leading principal components, the covariance model chosen by BIC as well (model-based
  clustering, Fraley & Raftery, 2002). Score of K is ``-BIC``; one cluster is a first-class
  answer.
- ``silhouette``: mean cosine silhouette of k-means with K clusters. Undefined for K = 1; a
  best silhouette below ``min_silhouette`` means "no cluster structure" and answers 1.
- ``stability``: agreement (ARI) of k-means fitted on two random halves of the data, over
  resamplings (Ben-Hur et al., 2002; Lange et al., 2004). Undefined for K = 1 (a single
  cluster is trivially stable), answered like ``silhouette``.
- ``null_stability``: the same agreement minus the agreement on structureless data of the same
  covariance (Gaussian reference sets drawn in feature space and prepared the same way, as the
  gap statistic's reference, Tibshirani et al., 2001, and Clest, Dudoit & Fridlyand, 2002).
  Plain stability favours K = 2 on any elongated cloud, since two halves cut it the same way;
  the reference removes that. K = 1 scores 0 (no excess over no structure) and wins unless
  some K's excess is significant against the references' spread (5 % over all K tested).
- ``consensus``: each of the two above does the part it is good at. ``null_stability`` decides
  *whether* there is cluster structure (its reference is made for the question "one cluster or
  more", as the gap statistic's is); if there is, ``eigengap`` decides *how many*, over K >= 2.
  The eigengap's own K = 1 answer is left out there: a large first gap says that the graph is
  not split into near-components, which one broad cluster with a few diffuse ones also gives,
  and null stability's K > 1 answers lean to the largest K that splits stably rather than to
  the separation. The confidence is the share of random 80 % subsets of the crops on which the
  estimate's eigengap is at least the runner-up's.

Features are L2-normalised (the classifier heads are cosine classifiers) and reduced with PCA
before any estimator runs; see :func:`prepare_features`.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csgraph
from scipy.spatial.distance import cdist
from scipy.stats import t as student_t
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

METHODS = ("bic", "silhouette", "eigengap", "stability", "null_stability", "consensus")


@dataclass
class KEstimate:
    """An estimated number of classes and the evidence for it.

    k: the chosen number of classes. candidates: the Ks scored, ``1..k_max``. scores: one score
    per candidate under ``method`` (higher is better; ``nan`` where undefined). method: the
    estimator's name. runner_up: the next best K (``None`` with one candidate). confidence:
    the share of resamplings in which ``k`` scores at least as well as the runner-up
    (``stability``, ``null_stability``; ``None`` for the estimators that do not resample).
    """

    k: int
    candidates: list[int]
    scores: list[float]
    method: str
    runner_up: int | None = None
    confidence: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: ``nan`` scores become ``None``."""
        return {
            "k": self.k,
            "method": self.method,
            "candidates": list(self.candidates),
            "scores": [_finite_or_none(s) for s in self.scores],
            "runner_up": self.runner_up,
            "confidence": self.confidence,
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


#: prepared features (unit rows, centred) all within this of the origin are one point
ONE_POINT = 1e-9


def prepare_features(features: np.ndarray, n_components: int = 32) -> np.ndarray:
    """L2-normalise rows, centre, and project on the top principal components.

    features: float (M, D). Returns float64 (M, min(n_components, D, M)). PCA keeps the
    estimators fast and drops directions that carry only noise; rows that are all zero stay zero.
    """
    x = _check_features(features)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(axis=0, keepdims=True)
    n = min(n_components, x.shape[0], x.shape[1])
    # SVD of the centred data; sign-fix each component for determinism
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    signs = np.sign(vt[:n, np.argmax(np.abs(vt[:n]), axis=1)].diagonal())
    signs[signs == 0] = 1
    return u[:, :n] * s[:n] * signs


def _check_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (M, D), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature rows to estimate a number of classes, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    return x


def _k_max(k_max: int, m: int) -> int:
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    return max(1, min(k_max, m - 1))


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 4) -> KMeans:
    with warnings.catch_warnings():  # duplicate crops give fewer distinct clusters than k: expected
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)


# -- estimators -------------------------------------------------------------------------------


COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def bic_scores(x: np.ndarray, k_max: int, n_components: int = 11, reg_covar: float = 1e-4, seed: int = 0) -> np.ndarray:
    """``-BIC`` of the best Gaussian mixture with K components, K = 1..k_max.

    x: float (M, d) prepared features (principal components, largest first). Only the first
    ``n_components`` columns are modelled, scaled so that the first has unit standard deviation,
    which makes ``reg_covar`` (added to every covariance diagonal) a fixed fraction of the data's
    spread. For each K the covariance model (full, tied, diagonal or spherical) is chosen by BIC
    too, as model-based clustering does: full covariances fit clusters of different shapes,
    the simpler models keep isotropic clusters from being split for want of data.
    Returns float (k_max,), higher is better. The defaults (11 components, ``reg_covar`` 1e-4)
    were chosen on 10 demo seeds and the blob tests, so they are tuned, not universal: with 8
    to 12 components the demo estimates stayed within one of the true K, with ``reg_covar``
    1e-3 they fell to 2-3.
    """
    m = len(x)
    k_max = _k_max(k_max, m)
    z = x[:, : max(1, n_components)]
    z = z / max(float(z[:, 0].std()), 1e-12)
    out = np.full(k_max, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in range(1, k_max + 1):
            for cov in COVARIANCE_TYPES:
                gmm = GaussianMixture(k, covariance_type=cov, reg_covar=reg_covar, n_init=3, random_state=seed)
                out[k - 1] = max(out[k - 1], -gmm.fit(z).bic(z))
    return out


def eigengap_scores(x: np.ndarray, k_max: int, n_neighbors: int = 10, scale_neighbor: int = 7) -> np.ndarray:
    """Eigengaps of the normalised Laplacian of a locally scaled kNN graph.

    x: float (M, d) prepared features. Returns float (k_max,): entry K-1 is
    ``lambda_{K+1} - lambda_K`` (eigenvalues ascending, ``lambda_1 = 0``), K = 1..k_max.
    The affinity of neighbours i, j is ``exp(-d_ij^2 / (sigma_i sigma_j))``, sigma_i being the
    distance from i to its ``scale_neighbor``-th neighbour; the graph is symmetrised by union.
    """
    m = len(x)
    k_max = _k_max(k_max, m)
    nn = max(1, min(n_neighbors, m - 1))
    d = cdist(x, x)
    order = np.argsort(d, axis=1, kind="stable")[:, 1 : nn + 1]
    sigma = d[np.arange(m), order[:, min(scale_neighbor, nn) - 1]]
    sigma = np.maximum(sigma, 1e-12)
    a = np.zeros((m, m))
    rows = np.repeat(np.arange(m), nn)
    cols = order.ravel()
    a[rows, cols] = np.exp(-(d[rows, cols] ** 2) / (sigma[rows] * sigma[cols]))
    a = np.maximum(a, a.T)
    lap = csgraph.laplacian(a, normed=True)
    lam = np.linalg.eigvalsh(lap)[: k_max + 1]  # k_max < m, so there are k_max + 1 of them
    return np.diff(lam)


def silhouette_scores(x: np.ndarray, k_max: int, seed: int = 0, sample_size: int = 3000) -> np.ndarray:
    """Cosine silhouette of k-means with K clusters, K = 1..k_max (K = 1 is ``nan``).

    x: float (M, d) prepared features. Returns float (k_max,). Above ``sample_size`` points the
    silhouette (quadratic in M) is averaged over a seeded random sample of that size.
    """
    m = len(x)
    k_max = _k_max(k_max, m)
    out = np.full(k_max, np.nan)
    for k in range(2, k_max + 1):
        labels = _kmeans(x, k, seed).labels_
        if len(np.unique(labels)) > 1:
            n = sample_size if m > sample_size else None
            out[k - 1] = silhouette_score(x, labels, metric="cosine", sample_size=n, random_state=seed)
    return out


def split_agreements(x: np.ndarray, k_max: int, splits: list[np.ndarray], seed: int = 0, ks: list[int] | None = None) -> np.ndarray:
    """ARI between k-means fitted on the two halves of each split, compared on all points.

    x: float (M, d) prepared features; splits: permutations of ``range(M)``, each cut in two
    halves. Returns float (len(splits), k_max); column K-1 holds K's agreements, K = 1 is
    ``nan`` (and any K larger than a half). ``ks``: only these Ks (the others ``nan``).
    """
    m = len(x)
    out = np.full((len(splits), k_max), np.nan)
    for b, perm in enumerate(splits):
        half_a, half_b = perm[: m // 2], perm[m // 2 :]
        for k in range(2, min(k_max, len(half_a), len(half_b)) + 1):
            if ks is not None and k not in ks:
                continue
            la = _kmeans(x[half_a], k, seed + b, n_init=2).predict(x)
            lb = _kmeans(x[half_b], k, seed + b, n_init=2).predict(x)
            out[b, k - 1] = adjusted_rand_score(la, lb)
    return out


def stability_scores(x: np.ndarray, k_max: int, n_resamples: int = 10, seed: int = 0) -> np.ndarray:
    """Mean ARI between k-means fitted on two disjoint random halves, compared on all points.

    x: float (M, d) prepared features. Returns float (k_max,), K = 1 is ``nan``. Each
    resampling splits the points in two halves, fits k-means with K clusters on each, labels
    every point with both models and scores the agreement of the two labellings with the
    adjusted Rand index.
    """
    m = len(x)
    k_max = _k_max(k_max, m)
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(m) for _ in range(n_resamples)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-nan column
        return np.nanmean(split_agreements(x, k_max, splits, seed), axis=0)


def null_reference(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Structureless features of the same mean and covariance: float (M, D).

    A Gaussian sample of M rows whose covariance is the features' sample covariance (drawn as
    random combinations of the centred rows, so its cost is O(M^2 D) whatever D is).
    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0, keepdims=True)
    m = len(x)
    return mean + rng.standard_normal((m, m)) @ (x - mean) / np.sqrt(max(m - 1, 1))


@dataclass
class NullStability:
    """What :func:`null_stability_scores` measured. Per candidate K (k_max,): ``excess``, the
    data's mean agreement minus the references' (K = 1: 0), ``null_sd``, the spread of the
    references' mean agreement (K = 1: 0); per split and K (n_resamples, k_max):
    ``split_excess``, one split's agreement minus the references' mean."""

    excess: np.ndarray
    null_sd: np.ndarray
    split_excess: np.ndarray


def _null_design(features: np.ndarray, k_max: int, n_resamples: int, n_references: int, seed: int):
    """What null stability compares: the clamped ``k_max``, ``n_resamples`` permutations of the
    rows, and the sets ``[features, reference_1, ...]`` (float (M, D) each), all drawn in this
    order from ``seed`` (so the same whatever runs them, in whatever threads)."""
    x = _check_features(features)
    k_max = _k_max(k_max, len(x))
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(len(x)) for _ in range(n_resamples)]
    return k_max, splits, [x] + [null_reference(x, rng) for _ in range(n_references)]


def null_stability_scores(
    features: np.ndarray,
    k_max: int,
    *,
    n_resamples: int = 10,
    n_references: int = 10,
    n_components: int = 32,
    seed: int = 0,
) -> NullStability:
    """Split-half stability of k-means in excess of structureless reference data.

    features: float (M, D) raw features (each reference set is drawn from their covariance,
    :func:`null_reference`, and goes through :func:`prepare_features` as they do, so that
    the PCA's own fit to noise is in both). The data and every reference are cut by the same
    ``n_resamples`` splits. K = 1 scores 0: no more agreement than no structure gives.
    """
    k_max, splits, sets = _null_design(features, k_max, n_resamples, n_references, seed)
    # k-means releases the GIL: the sets' agreements in parallel, one thread each
    with ThreadPoolExecutor(min(len(sets), os.cpu_count() or 1)) as pool:
        agreements = list(pool.map(lambda s: split_agreements(prepare_features(s, n_components), k_max, splits, seed), sets))
    excess, null_sd, split_excess = _excess_over_null(agreements[0], np.stack(agreements[1:]))
    excess[0], null_sd[0], split_excess[:, 0] = 0.0, 0.0, 0.0
    return NullStability(excess, null_sd, split_excess)


def _excess_over_null(data: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data's split agreements (B, ...) against the references' (R, B, ...): the mean
    excess over the references' mean agreement (...), the spread of the references' mean
    agreements (...; 0 with one reference) and each split's excess (B, ...). ``nan`` (K = 1,
    Ks above a half) stays ``nan``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns
        ref_means = np.nanmean(refs, axis=1)
        null_sd = np.nanstd(ref_means, axis=0, ddof=1) if len(refs) > 1 else np.zeros(ref_means.shape[1:])
        split_excess = data - np.nanmean(ref_means, axis=0)
        return np.nanmean(split_excess, axis=0), null_sd, split_excess


def _significant(excess: np.ndarray, null_sd: np.ndarray, null_z: float) -> np.ndarray:
    """bool, elementwise: an excess above 0 and above ``null_z`` times the references' spread
    (``nan`` excess or spread: not significant)."""
    excess = np.nan_to_num(excess, nan=-np.inf)
    return (excess > null_z * np.nan_to_num(null_sd, nan=np.inf)) & (excess > 0)


def has_structure(
    features: np.ndarray,
    k_max: int,
    *,
    n_resamples: int = 10,
    n_references: int = 10,
    n_components: int = 32,
    seed: int = 0,
    alpha: float = 0.05,
) -> bool:
    """Whether ``null_stability`` answers K > 1: the same splits, references and test as
    :func:`null_stability_scores` and :func:`pick_null_stability`, taken K by K from K = 2 and
    stopped at the first K whose excess is significant (where there is structure, a fraction of
    the k-means fits). features: float (M, D) raw features."""
    k_max, splits, sets = _null_design(features, k_max, n_resamples, n_references, seed)
    null_z = significance_z(n_references, k_max - 1, alpha)
    with ThreadPoolExecutor(min(len(sets), os.cpu_count() or 1)) as pool:
        prepared = list(pool.map(lambda s: prepare_features(s, n_components), sets))
        for k in range(2, k_max + 1):
            a = np.stack(list(pool.map(lambda z: split_agreements(z, k_max, splits, seed, ks=[k])[:, k - 1], prepared)))
            if np.isnan(a[0]).all():  # K above half the crops: no larger K can be fitted either
                break
            excess, null_sd, _ = _excess_over_null(a[0], a[1:])
            if _significant(excess, null_sd, null_z):
                return True
    return False


def significance_z(n_references: int, n_candidates: int, alpha: float = 0.05) -> float:
    """How many standard deviations of the references an excess must reach: the one-sided
    Student t quantile at ``alpha`` shared over the ``n_candidates`` Ks tested (Bonferroni), with
    ``n_references - 1`` degrees of freedom (the spread is estimated from that few sets)."""
    return float(student_t.isf(alpha / max(n_candidates, 1), df=max(n_references - 1, 1)))


def pick_null_stability(ns: NullStability, null_z: float) -> tuple[int, int | None, float]:
    """The estimate, its runner-up and its confidence from :func:`null_stability_scores`.

    A K > 1 is a candidate when its excess is above 0 and ``null_z`` times the references'
    spread (:func:`significance_z`); the estimate is the candidate of largest excess, 1 when
    there is none. The runner-up is the next K by excess (K = 1's is 0); the confidence is
    :func:`paired_confidence` of the splits' excess.
    """
    excess = np.nan_to_num(ns.excess, nan=-np.inf)
    sig = _significant(ns.excess, ns.null_sd, null_z)
    sig[0] = True
    score = np.where(sig, excess, -np.inf)
    score[0] = 0.0
    k = int(np.argmax(score)) + 1  # ties to the smaller K
    others = [int(i) + 1 for i in np.argsort(-excess, kind="stable") if int(i) + 1 != k]
    runner_up = others[0] if others else None
    confidence = paired_confidence(ns.split_excess, k, runner_up)
    return k, runner_up, confidence


# -- the entry point --------------------------------------------------------------------------


def estimate_num_classes(
    features: np.ndarray,
    *,
    k_max: int,
    method: str,
    seed: int,
    n_components: int = 32,
    min_silhouette: float = 0.25,
    min_stability: float = 0.6,
    alpha: float = 0.05,
    n_references: int = 10,
) -> KEstimate:
    """Estimate the number of classes among ``features``.

    features: float (M, D), one row per crop (e.g. the normed [CLS] features). k_max: the
    largest K considered (clamped to M - 1). method: one of :data:`METHODS`. min_silhouette,
    min_stability: below these best scores, ``silhouette`` and ``stability`` answer K = 1.
    alpha, n_references: ``null_stability``'s chance of answering K > 1 on structureless data
    (:func:`significance_z`) and its number of reference sets. Deterministic for a given seed.

    The estimators fit thousands of k-means on a few hundred rows, where a BLAS or OpenMP
    thread pool costs more than it saves: they run on one thread (about 7x faster on two cores).
    """
    with threadpool_limits(1):
        return _estimate(features, k_max, method, seed, n_components, min_silhouette, min_stability, alpha, n_references)


def _estimate(features, k_max, method, seed, n_components, min_silhouette, min_stability, alpha, n_references) -> KEstimate:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    x = _check_features(features)
    m = len(x)
    k_max = _k_max(k_max, m)
    candidates = list(range(1, k_max + 1))
    z = prepare_features(x, n_components)
    # Rows that are one point on the unit sphere are one class. Their centred coordinates are
    # float noise (~1e-16), which k-means would split one way on one CPU and another way on another.
    if m < 3 or k_max == 1 or np.abs(z).max() < ONE_POINT:
        return KEstimate(1, candidates, [float("nan")] * k_max, method)
    if method == "null_stability":
        ns = null_stability_scores(x, k_max, n_references=n_references, n_components=n_components, seed=seed)
        k, runner_up, confidence = pick_null_stability(ns, significance_z(n_references, k_max - 1, alpha))
        return KEstimate(k, candidates, ns.excess.tolist(), method, runner_up, confidence)
    if method == "consensus":
        structure = has_structure(x, k_max, n_references=n_references, n_components=n_components, seed=seed, alpha=alpha)
        return consensus_estimate(z, k_max, structure, seed)
    if method == "bic":
        scores = bic_scores(z, k_max, seed=seed)
        k = int(np.argmax(scores)) + 1
    elif method == "eigengap":
        scores = eigengap_scores(z, k_max)
        k = int(np.argmax(scores)) + 1
    elif method == "silhouette":
        scores = silhouette_scores(z, k_max, seed)
        k = _pick_or_one(scores, min_silhouette)
    else:
        rng = np.random.default_rng(seed)
        per_split = split_agreements(z, k_max, [rng.permutation(m) for _ in range(10)], seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # K = 1: all nan
            scores = np.nanmean(per_split, axis=0)
        k = _pick_or_one(scores, min_stability)
        per_split[:, 0] = min_stability  # what K = 1 stands for: the floor a K must reach
        second = best_other_k(np.where(np.arange(k_max) == 0, min_stability, scores), k)
        return KEstimate(k, candidates, scores.tolist(), method, second, paired_confidence(per_split, k, second))
    return KEstimate(k, candidates, scores.tolist(), method, best_other_k(scores, k))


def consensus_estimate(z: np.ndarray, k_max: int, structure: bool, seed: int, n_subsets: int = 10, share: float = 0.8) -> KEstimate:
    """The ``consensus`` estimate from prepared features ``z`` (M, d) and the structure test's
    answer: without structure K = 1 (runner-up: the K >= 2 of the largest eigengap); with it the
    K >= 2 of the largest eigengap (K = 1's score ``nan``: not a candidate), the runner-up the
    next K >= 2. Confidence: the share of ``n_subsets`` seeded random subsets of ``share`` of the
    rows on which the estimate's eigengap is at least the runner-up's (with K = 1: the share on
    which no K >= 2 has a gap above the first one)."""
    candidates = list(range(1, k_max + 1))
    gaps = eigengap_scores(z, k_max)
    if k_max < 2:
        return KEstimate(1, candidates, gaps.tolist(), "consensus")
    best = int(np.argmax(gaps[1:])) + 2
    if structure:
        scores = gaps.copy()
        scores[0] = np.nan
        k, runner_up = best, best_other_k(scores, best)
    else:
        scores, k, runner_up = gaps, 1, best
    rng = np.random.default_rng(seed)
    m = len(z)
    wins = []
    for _ in range(n_subsets):
        rows = np.sort(rng.choice(m, size=max(3, int(round(share * m))), replace=False))
        g = eigengap_scores(z[rows], k_max)
        if len(g) < max(k, runner_up or 1):
            continue
        wins.append(g[0] >= g[1:].max() if k == 1 else runner_up is None or g[k - 1] >= g[runner_up - 1])
    confidence = float(np.mean(wins)) if wins else None
    return KEstimate(k, candidates, scores.tolist(), "consensus", runner_up, confidence)


def paired_confidence(per_split: np.ndarray, k: int, runner_up: int | None) -> float:
    """Share of resamplings in which the estimate ``k`` scores at least as well as the
    runner-up: per_split float (B, k_max), one row of scores per resampling (``nan``: the K
    could not be scored, counted as the lowest). 1.0 without a runner-up."""
    if runner_up is None or len(per_split) == 0:
        return 1.0
    s = np.nan_to_num(np.asarray(per_split, dtype=float), nan=-np.inf)
    return float(np.mean(s[:, k - 1] >= s[:, runner_up - 1]))


def best_other_k(scores: np.ndarray, k: int) -> int | None:
    """The best K other than ``k`` by ``scores`` (K = 1 first among undefined ones); ``None``
    with one candidate."""
    s = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf)
    others = [int(i) + 1 for i in np.argsort(-s, kind="stable") if int(i) + 1 != k]
    return others[0] if others else None


def _pick_or_one(scores: np.ndarray, floor: float) -> int:
    """argmax K of ``scores`` (nan ignored, ties to the smallest K); 1 if the best is below ``floor``."""
    if not np.isfinite(scores).any():
        return 1
    best = int(np.nanargmax(scores))
    return 1 if scores[best] < floor else best + 1


def count_massive_classes(probs: np.ndarray, min_fraction: float = 0.02) -> int:
    """Classes of an over-complete head that keep real mass.

    probs: float (M, K) class probabilities of M crops. A class counts when the share of crops
    whose argmax is that class is at least ``min_fraction``. Returns an int in 1..K.
    """
    p = np.asarray(probs)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be a non-empty 2-D array (M, K), got shape {p.shape}")
    share = np.bincount(p.argmax(axis=1), minlength=p.shape[1]) / len(p)
    return max(1, int((share >= min_fraction).sum()))


#: below this confidence (share of resamplings that agree) the estimate is called uncertain
UNCERTAIN_BELOW = 0.6


def estimate_summary(metrics: dict) -> tuple[str, list[str]]:
    """What the train stage prints and the report shows about the estimate: the line
    ``estimated K = n (...)`` with the runner-up and the confidence where the method gives them,
    the score curve and the K trained with, and the warnings of an ``auto`` estimate: at the
    largest K considered (``auto_max``, or fewer when the crops allow fewer) there may be more
    classes; at 1 no cluster structure was found; a confidence below :data:`UNCERTAIN_BELOW`
    means the runner-up is nearly as likely. ``metrics``: the dict of
    ``anomalyncd.auto_k.num_classes_metrics`` (``metrics/num_classes.json``)."""
    k, scores = metrics["estimate"], metrics.get("scores", {})
    curve = ", ".join(f"{c[1:]}: {v:.4g}" + ("*" if int(c[1:]) == k else "") for c, v in scores.items())
    used = "train.num_classes: auto" if metrics.get("auto") else "train.num_classes"
    runner_up, confidence = metrics.get("runner_up"), metrics.get("confidence")
    odds = ""
    if runner_up is not None:
        odds = f", runner-up {runner_up}" + (f", confidence {confidence:.2f}" if confidence is not None else "")
    line = (
        f"estimated K = {k}{odds} ({metrics['method']} over {metrics.get('crops', '?')} region crops; score by K, "
        f"higher is better: {curve or 'none defined'}); training with K = {metrics['num_classes']} ({used})"
    )
    if not metrics.get("auto"):
        return line, []
    prefix = f"params.yaml: train.num_classes auto: the estimate {k}"
    warns = []
    if k > 1 and k == metrics.get("largest_k"):
        if k == metrics.get("auto_max"):
            warns.append(
                f"{prefix} is the largest number considered (train.auto_max={k}), so there may be more classes; "
                "raise train.auto_max to check"
            )
        else:
            warns.append(
                f"{prefix} is the most that {metrics.get('crops')} crops with a region can tell apart, so there may be "
                "more classes; classify more images to check"
            )
    elif k == 1:
        warns.append(
            f"{prefix} means the crops' regions show no cluster structure (or fewer than 2 crops have a region); "
            "look at the crops in the report, or set train.num_classes"
        )
    if confidence is not None and runner_up is not None and confidence < UNCERTAIN_BELOW:
        warns.append(
            f"{prefix} is uncertain: {100 * confidence:.0f} % of the resamplings agree, the runner-up is {runner_up}; "
            f"compare with dvc exp run -S train.num_classes={runner_up}"
        )
    return line, warns
