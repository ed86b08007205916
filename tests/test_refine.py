"""MEBin's regions redrawn on the image (``mebin.refine: grabcut``): the outline follows what the
image shows inside the map's region, and nothing the classifier reads changes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomalyncd import mebin
from anomalyncd.config import MebinParams
from anomalyncd.io import InputError
from anomalyncd.refine import refine_mask


def surface(h=120, w=160, seed=0):
    """A grey surface with mild noise, as a part's background: uint8 (h, w, 3) RGB."""
    rng = np.random.default_rng(seed)
    g = np.clip(rng.normal(140, 6, (h, w)), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def smooth_map(defect, sigma):
    """A detector-like map: the defect blurred far beyond its edges, float32 (H, W)."""
    return cv2.GaussianBlur(defect.astype(np.float32), (0, 0), sigma) * 255


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_a_dark_hole_in_a_wide_smooth_region_is_outlined_at_its_own_edge():
    image = surface()
    hole = disc(image.shape[:2], (60, 80), 6)
    image[hole] = 40
    scores = smooth_map(hole, 8)
    region = scores > 0.15 * scores.max()  # the map's region: several times the hole
    assert region.sum() > 4 * hole.sum()
    out = refine_mask(image, region, scores)
    assert iou(out, hole) > 0.8
    assert not (out & ~region).any()  # a region only shrinks


def test_a_region_the_image_cannot_split_is_kept_as_the_map_drew_it():
    image = np.full((80, 80, 3), 120, np.uint8)  # the defect has the surface's own colour
    region = disc((80, 80), (40, 40), 15)
    scores = smooth_map(disc((80, 80), (40, 40), 4), 6)
    assert (refine_mask(image, region, scores) == region).all()


def test_each_region_is_refined_on_its_own_and_the_result_is_the_same_whatever_came_before():
    image = surface()
    holes = disc(image.shape[:2], (30, 40), 5) | disc(image.shape[:2], (90, 120), 7)
    image[holes] = 30
    scores = smooth_map(holes, 7)
    regions = scores > 0.15 * scores.max()
    assert cv2.connectedComponents(regions.astype(np.uint8))[0] - 1 == 2
    first = refine_mask(image, regions, scores, seed=3)
    cv2.setRNGSeed(12345)
    cv2.kmeans(np.random.default_rng(0).random((50, 2), dtype=np.float32), 3, None,
               (cv2.TERM_CRITERIA_MAX_ITER, 5, 0), 1, cv2.KMEANS_RANDOM_CENTERS)  # moves OpenCV's generator
    assert (refine_mask(image, regions, scores, seed=3) == first).all()
    for left in (disc(image.shape[:2], (30, 40), 5), disc(image.shape[:2], (90, 120), 7)):
        assert iou(first & disc(image.shape[:2], tuple(np.argwhere(left).mean(0).astype(int)), 20), left) > 0.7


def test_refine_changes_only_the_stored_mask_not_the_crops_their_masks_areas_or_boxes():
    image = surface(128, 128, seed=1)
    hole = disc((128, 128), (64, 50), 6)
    image[hole] = 35
    map_u8 = np.clip(smooth_map(cv2.resize(hole.astype(np.uint8), (64, 64), interpolation=cv2.INTER_AREA) > 0, 4), 0, 255).astype(np.uint8)
    params = dict(crop_size=32, core=0.0)
    off, c_off = mebin.mebin_image(map_u8, image, 0, 255, MebinParams(refine="off", **params))
    on, c_on = mebin.mebin_image(map_u8, image, 0, 255, MebinParams(refine="grabcut", **params))
    for name in ("crops", "crop_masks", "boxes", "regions", "areas", "scores"):
        assert np.array_equal(getattr(c_on, name), getattr(c_off, name)), name
    assert (on.threshold, on.est_count) == (off.threshold, off.est_count)
    assert np.array_equal(on.map_mask, off.mask) and np.array_equal(off.map_mask, off.mask)
    assert not (on.mask & ~on.map_mask).any() and on.mask.sum() < on.map_mask.sum()
    assert iou(on.mask, hole) > iou(off.mask, hole)


@pytest.mark.parametrize("bad", ["auto", "guided", True])
def test_refine_must_be_a_known_method_once_resolved(bad):
    with pytest.raises(InputError, match="mebin.refine must be one of"):
        mebin.check_params(MebinParams(crop_size=8, core=0.0, refine=bad))


def _refined_in_a_fresh_process(args):
    return refine_mask(*args)


def test_a_worker_process_draws_the_same_outlines():
    """The mebin stage runs images in spawned worker processes, each with its own OpenCV
    generator: GrabCut's k-means start must not depend on it."""
    import multiprocessing

    blob = disc((64, 64), (32, 30), 5)
    image = surface(64, 64, seed=2)
    image[blob] -= 25  # a faint spot in the surface's noise
    scores = smooth_map(blob, 6)
    region = scores > 0.1 * scores.max()
    here = refine_mask(image, region, scores, seed=1)
    assert not np.array_equal(here, region)  # GrabCut did cut this region
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.map(_refined_in_a_fresh_process, [(image, region, scores, 1)])[0]
    assert np.array_equal(here, there)
