"""Region scores of predicted masks against true defects (anomalyncd.regions)."""

import numpy as np
import pytest

from anomalyncd import mebin
from anomalyncd.config import MebinParams
from anomalyncd.regions import paste_crop_masks, region_scores, summarize, without_stable_interval


def square(shape, x0, y0, side):
    m = np.zeros(shape, bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_a_perfect_mask_scores_one():
    t = square((64, 64), 10, 10, 8)
    s = region_scores(t, t)
    assert s.iou.tolist() == [1.0] and s.precision.tolist() == [1.0] and s.recall.tolist() == [1.0]
    assert s.hit.tolist() == [True] and s.extra == 0


def test_a_mask_four_times_the_defect_has_precision_and_iou_a_quarter_and_full_recall():
    t = square((64, 64), 12, 12, 8)
    p = square((64, 64), 8, 8, 16)  # 16 x 16 around the 8 x 8 defect
    s = region_scores(t, p)
    assert s.precision[0] == pytest.approx(0.25) and s.iou[0] == pytest.approx(0.25) and s.recall[0] == 1.0


def test_half_a_defect_has_recall_one_half_and_full_precision():
    t = square((64, 64), 0, 0, 8)
    p = np.zeros_like(t)
    p[:4, :8] = True
    s = region_scores(t, p)
    assert s.recall[0] == 0.5 and s.precision[0] == 1.0 and s.iou[0] == 0.5


def test_a_missed_region_is_not_hit_scores_zero_and_has_no_precision():
    t = square((64, 64), 0, 0, 8) | square((64, 64), 40, 40, 8)
    p = square((64, 64), 0, 0, 8)
    s = region_scores(t, p)
    assert s.hit.tolist() == [True, False]
    assert s.iou.tolist() == [1.0, 0.0] and s.recall.tolist() == [1.0, 0.0]
    assert np.isnan(s.precision[1])


def test_a_predicted_region_on_no_defect_counts_as_extra_and_does_not_lower_the_scores():
    t = square((64, 64), 0, 0, 8)
    p = t | square((64, 64), 40, 40, 8)
    s = region_scores(t, p)
    assert s.extra == 1 and s.iou.tolist() == [1.0] and s.precision.tolist() == [1.0]


def test_one_blob_over_two_defects_is_not_charged_for_the_other_defect():
    t = square((64, 64), 0, 0, 8) | square((64, 64), 10, 0, 8)
    p = np.zeros_like(t)
    p[:8, :18] = True  # both defects and the 2-pixel gap between them
    s = region_scores(t, p)
    # for each defect: its 64 pixels and the 16 gap pixels; the other defect's pixels left out
    assert s.precision.tolist() == pytest.approx([0.8, 0.8]) and s.recall.tolist() == [1.0, 1.0]
    assert s.iou.tolist() == pytest.approx([0.8, 0.8])


def test_regions_of_min_area_or_fewer_pixels_are_not_scored():
    t = square((64, 64), 0, 0, 8) | square((64, 64), 40, 40, 2)
    assert len(region_scores(t, t, min_area=4)) == 1
    assert len(region_scores(t, t)) == 2


def test_an_empty_true_mask_has_no_region_and_masks_of_other_shapes_are_refused():
    s = region_scores(np.zeros((8, 8), bool), square((8, 8), 0, 0, 2))
    assert len(s) == 0 and s.extra == 1
    with pytest.raises(ValueError, match="differ in shape"):
        region_scores(np.zeros((8, 8), bool), np.zeros((8, 9), bool))


def test_summary_is_the_mean_over_images_of_each_images_mean():
    t = square((64, 64), 0, 0, 8) | square((64, 64), 40, 40, 8)
    a = region_scores(t, square((64, 64), 0, 0, 8))  # one of two hit: IoU 1 and 0
    b = region_scores(square((64, 64), 0, 0, 8), square((64, 64), 0, 0, 8))  # IoU 1
    empty = region_scores(np.zeros((64, 64), bool), np.zeros((64, 64), bool))  # no region: left out
    out = summarize([a, b, empty])
    assert out["images"] == 2 and out["regions"] == 3 and out["regions_hit"] == 2
    assert out["iou"] == pytest.approx((0.5 + 1.0) / 2) and out["precision"] == 1.0
    assert out["recall"] == pytest.approx(0.75)
    assert out["extra_regions_per_image"] == 0.0


def test_pasted_crop_masks_give_back_the_image_mask_and_clip_boxes_outside_the_image():
    mask = square((40, 40), 4, 4, 6)
    boxes = np.array([[-4, -4, 16, 16], [30, 30, 50, 50]])
    crops = [mebin.resize_short_side(mebin.crop_padded(mask.astype(np.uint8), b), 40, 0) for b in boxes]
    assert np.array_equal(paste_crop_masks(mask.shape, boxes, crops), mask)


def test_without_stable_interval_flags_maps_with_no_region_on_the_sets_range():
    p = MebinParams(crop_size=32, core=0.0, refine="off")
    flat = np.full((32, 32), 10, np.uint8)
    peak = np.zeros((32, 32), np.uint8)
    peak[10:20, 10:20] = 200
    lo, hi = mebin.search_range([flat, peak])
    assert without_stable_interval(flat, lo, hi, p) and not without_stable_interval(peak, lo, hi, p)
