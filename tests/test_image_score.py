"""The image score: top means at several areas, standardised on held-back normal maps."""

import cv2
import numpy as np
import pytest

from anomalyncd.image_score import ImageScore, top_means
from anomalyncd.io import InputError

TOPS = (0.001, 0.01, 0.1, 0.3)


def normal_maps(n: int, seed: int = 0) -> np.ndarray:
    """Maps (n, 64, 64) of a detector on defect-free images: smooth noise about a level that
    varies a little from image to image."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, 64, 64)).astype(np.float32)
    for x in noise:
        x[:] = cv2.GaussianBlur(x, (0, 0), 3.0)
    if n:
        noise *= 0.1 / noise.std()
    return (1.0 + 0.03 * rng.standard_normal((n, 1, 1)) + noise).astype(np.float32)


def test_top_means_are_the_mean_of_each_fraction_of_highest_pixels_or_the_maximum():
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 0, 0] = 10.0  # one hot pixel: noise
    maps[1, :2, :] = 2.0  # a region of 20 pixels
    np.testing.assert_allclose(top_means(maps, [0.0, 0.1, 0.001]), [[10.0, 1.0, 10.0], [2.0, 2.0, 2.0]])  # >= 1 pixel
    assert top_means(np.zeros((0, 4, 4)), TOPS).shape == (0, 4)


def test_a_speck_and_a_large_faint_region_both_score_above_every_normal_map():
    reference, normals = normal_maps(40, seed=0), normal_maps(40, seed=1)
    speck, faint = normal_maps(1, seed=2), normal_maps(1, seed=3)
    speck[0, 30:32, 30:32] += 2.0  # 4 pixels, far above the noise
    faint[0, :40, :] += 0.25  # 40 % of the map, a fraction of the noise's range
    score = ImageScore.fit(TOPS, top_means(reference, TOPS))
    assert score.standardised
    s_normal, s_speck, s_faint = score(normals), score(speck)[0], score(faint)[0]
    assert s_speck > s_normal.max() and s_faint > s_normal.max()
    # one area alone misses one of them: the top 30 % averages the speck away
    top30 = ImageScore.fit((0.3,), top_means(reference, (0.3,)))
    assert top30(speck)[0] < top30(normals).max() < top30(faint)[0]


def test_standardised_scores_do_not_depend_on_the_maps_units():
    reference, maps = normal_maps(20, seed=0), normal_maps(5, seed=1)
    a = ImageScore.fit(TOPS, top_means(reference, TOPS))(maps)
    b = ImageScore.fit(TOPS, top_means(3.0 * reference + 7.0, TOPS))(3.0 * maps + 7.0)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_reference", [0, 1, 2])
def test_without_a_reference_the_score_is_the_mean_of_the_top_means(n_reference):
    maps = normal_maps(3, seed=1)
    score = ImageScore.fit(TOPS, top_means(normal_maps(n_reference), TOPS))
    assert not score.standardised
    np.testing.assert_allclose(score(maps), top_means(maps, TOPS).mean(1), rtol=1e-6)


def test_the_reference_images_are_each_scored_on_the_others_as_a_new_normal_image_is():
    means = top_means(normal_maps(6), TOPS)
    score = ImageScore.fit(TOPS, means)
    own = score.reference_scores(means)
    for i in range(6):
        assert own[i] == pytest.approx(ImageScore.fit(TOPS, np.delete(means, i, 0)).of_top_means(means[i : i + 1])[0])
    # so a threshold on a few of them flags new normal images at about the rate it promises:
    # scored on themselves, 8 images look more alike than new ones and too many new ones pass it
    new = top_means(normal_maps(400, seed=99), TOPS)
    rates = {"own": [], "on themselves": []}
    for seed in range(20):
        ref = top_means(normal_maps(8, seed=100 + seed), TOPS)
        s = ImageScore.fit(TOPS, ref)
        for name, cal in (("own", s.reference_scores(ref)), ("on themselves", s.of_top_means(ref))):
            rates[name].append(np.mean(s.of_top_means(new) > np.quantile(cal, 0.9)))
    assert np.mean(rates["own"]) < np.mean(rates["on themselves"])
    assert np.mean(rates["own"]) < 0.15


def test_a_reference_without_spread_is_no_reference():
    flat = np.ones((5, 8, 8), np.float32)
    assert not ImageScore.fit(TOPS, top_means(flat, TOPS)).standardised


def test_the_score_is_stored_with_the_maps_and_read_back_and_old_stores_keep_their_single_top():
    score = ImageScore.fit(TOPS, top_means(normal_maps(10), TOPS))
    again = ImageScore.from_attrs({"image_score": score.to_attrs()})
    maps = normal_maps(4, seed=5)
    np.testing.assert_array_equal(again(maps), score(maps))
    old = ImageScore.from_attrs({"params": {"score_top": 0.02}})  # a store from before score_tops
    np.testing.assert_allclose(old(maps), top_means(maps, [0.02])[:, 0], rtol=1e-6)


@pytest.mark.parametrize("attrs", [
    {"tops": []},
    {"tops": [0.01, 0.1], "centre": [1.0, 2.0], "scale": None},
    {"tops": [0.01, 0.1], "centre": [1.0], "scale": [1.0]},
    {"tops": [0.01], "centre": [1.0], "scale": [0.0]},
    {"centre": None},
    "0.01",
])
def test_damaged_score_attrs_are_an_error_naming_the_store(attrs):
    with pytest.raises(InputError, match=r"maps\.zarr\.zip: damaged image_score attrs.*rerun detect"):
        ImageScore.from_attrs({"image_score": attrs}, "data/detect/maps.zarr.zip")
