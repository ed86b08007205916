"""Detection metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomalyncd.detect.metrics import aupro, detection_metrics, image_auroc, pixel_auroc, pro_curve, resize_masks


def two_region_toy() -> tuple[np.ndarray, np.ndarray]:
    """Two 2x3 images. Image 0: region A = one pixel scored 0.9; background 0.5 once, else 0.
    Image 1: region B = two pixels scored 0.3 and 0.2; background 0. Nine background pixels."""
    maps = np.zeros((2, 2, 3), np.float32)
    masks = np.zeros((2, 2, 3), bool)
    maps[0, 0, 0], masks[0, 0, 0] = 0.9, True
    maps[0, 0, 2] = 0.5
    maps[1, 1, 1:] = [0.3, 0.2]
    masks[1, 1, 1:] = True
    return maps, masks


def test_image_auroc_counts_correctly_ordered_pairs():
    assert image_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_image_auroc_is_nan_without_normal_images():
    assert math.isnan(image_auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_pixel_auroc_of_the_toy():
    maps, masks = two_region_toy()
    # positives 0.9, 0.3, 0.2 against negatives 0.5 and eight 0: (9 + 8 + 8) / 27
    assert pixel_auroc(maps, masks) == pytest.approx(25 / 27)


def test_pro_curve_averages_over_regions_not_pixels():
    maps, masks = two_region_toy()
    fpr, pro = pro_curve(maps, masks)
    # thresholds 0.9, 0.5, 0.3, 0.2, 0: at 0.3 region A is fully and region B half covered
    np.testing.assert_allclose(fpr, [0, 0, 1 / 9, 1 / 9, 1 / 9, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 1.0, 1.0])


def test_aupro_integrates_to_fpr_limit_and_normalises():
    maps, masks = two_region_toy()
    # PRO 0.5 on FPR [0, 1/9], 1.0 on [1/9, 0.3]; divided by 0.3
    expected = (0.5 / 9 + (0.3 - 1 / 9)) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected)


def test_aupro_interpolates_at_the_fpr_limit():
    maps = np.array([[[1.0, 0.0, 0.0, 0.0]]], np.float32)
    masks = np.array([[[False, True, False, False]]])
    maps[0, 0, 1] = 0.5
    # FPR jumps 0 -> 1/3 at threshold 1.0 (PRO 0), then PRO 1 at 0.5; linear from (0, 0) to (1/3, 0)
    # then vertical: area up to 0.3 is 0
    assert aupro(maps, masks) == pytest.approx(0.0)
    assert aupro(maps, masks, max_fpr=0.5) == pytest.approx((0.5 - 1 / 3) / 0.5)


def test_perfect_maps_score_one():
    maps, masks = two_region_toy()
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert pixel_auroc(perfect, masks) == pytest.approx(1.0)


def test_detection_metrics_reports_all_three():
    maps, masks = two_region_toy()
    out = detection_metrics(maps, maps.reshape(2, -1).max(1), masks, np.array([1, 1]))
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro"}
    assert math.isnan(out["image_auroc"])


def test_resize_masks_keeps_thin_lines():
    m = np.zeros((100, 60), bool)
    m[:, 30] = True
    out = resize_masks([m], 32)
    assert out.shape == (1, 32, 32) and out[0].any(axis=1).all()
