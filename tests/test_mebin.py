"""MEBin rules (issue 3) pinned on small hand-made maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomalyncd import mebin
from anomalyncd.config import MebinParams
from anomalyncd.io import InputError

# the knobs at their defaults (config.py is the only place they exist), but the paper's crop
# padding: the box geometry below is worked out for it
P = MebinParams(crop_size=256, padding=0.1, core=0.0, refine="off")

KERNEL = np.ones((6, 6), np.uint8)


def literal_counts(map_u8, lo, hi, sample_rate=4, erosion="paper"):
    """Rule 3 word for word: rescale, then binarize, filter the noise and label at every
    threshold (paper: erode with the 6 x 6 kernel; keep_thin: erode, and count the regions
    the erosion erased whole that have at least 36 * (side / 256) ** 2 pixels)."""
    norm = np.where(map_u8 < lo, 0, (map_u8.astype(np.float64) - lo) / (hi - lo) * 255)
    min_area = max(1, round(36 * (max(map_u8.shape) / 256) ** 2))
    out = []
    for t in range(255, 0, -sample_rate):
        b = np.where(norm > t, 255, 0).astype(np.uint8)
        eroded = cv2.erode(b, KERNEL)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
        if erosion == "paper":
            out.append(cv2.connectedComponents(eroded, connectivity=8)[0] - 1)
        elif erosion == "keep_thin":  # eroded regions, plus regions the erosion erased whole
            erased = [k for k in range(1, n) if not eroded[labels == k].any() and stats[k, cv2.CC_STAT_AREA] >= min_area]
            out.append(cv2.connectedComponents(eroded, connectivity=8)[0] - 1 + len(erased))
        else:
            out.append(n - 1)
    return out


def blob_map(size=40, blobs=((10, 10, 6, 200),), noise=0, seed=0):
    """uint8 (size, size): square blocks (x, y, half-side, value) plus uniform noise."""
    m = np.zeros((size, size), np.float64)
    for x, y, r, v in blobs:
        m[y - r : y + r, x - r : x + r] = v
    m += np.random.default_rng(seed).uniform(0, noise, m.shape) if noise else 0
    return np.clip(m, 0, 255).astype(np.uint8)


# -- rule 1 ---------------------------------------------------------------------------------


def test_search_range_is_smallest_and_largest_map_maximum():
    maps = np.stack([blob_map(blobs=((10, 10, 3, v),)) for v in (90, 200, 150)])
    assert mebin.search_range(maps) == (90, 200)
    assert mebin.search_range(list(maps)) == (90, 200)


def test_search_range_with_equal_maxima_warns_and_uses_zero_as_lo():
    with pytest.warns(RuntimeWarning, match="lo = 0"):
        assert mebin.search_range([blob_map(blobs=((10, 10, 3, 120),))]) == (0, 120)


def test_search_range_rejects_an_empty_set_and_float_maps():
    with pytest.raises(InputError, match="at least one"):
        mebin.search_range([])
    with pytest.raises(InputError, match="uint8"):
        mebin.search_range([np.full((4, 4), np.nan)])


# -- rules 2 and 3 --------------------------------------------------------------------------


def test_rescale_zeroes_values_below_lo_and_stretches_the_rest_to_255():
    m = np.array([[10, 50], [100, 200]], np.uint8)
    np.testing.assert_allclose(mebin.rescale(m, 50, 200), [[0, 0], [50 / 150 * 255, 255]])


def test_sweep_thresholds_step_down_from_255_while_positive():
    ts = mebin.sweep_thresholds(4)
    assert ts[0] == 255 and ts[-1] == 3 and len(ts) == 64 and np.all(np.diff(ts) == -4)


@pytest.mark.parametrize("erosion", mebin.EROSION_RULES)
@pytest.mark.parametrize("lo,hi", [(40, 230), (0, 255), (120, 180)])
def test_count_sequence_equals_labelling_at_every_threshold(erosion, lo, hi):
    rng = np.random.default_rng(lo + hi)
    for seed in range(4):
        m = np.zeros((96, 80), np.float32)  # keep_thin: erased regions of at least 5 pixels stay
        for _ in range(rng.integers(1, 5)):
            x, y = (int(v) for v in rng.integers(0, 80, 2))
            cv2.circle(m, (x, y), int(rng.integers(2, 9)), float(rng.uniform(0.3, 1.0)), -1)
        m = cv2.GaussianBlur(m, (0, 0), 2) * 255 + rng.uniform(0, 40, m.shape)
        m = np.clip(m, 0, 255).astype(np.uint8)
        got = mebin.count_sequence(m, lo, hi, sample_rate=3 + seed % 2, erosion=erosion)
        assert got.tolist() == literal_counts(m, lo, hi, 3 + seed % 2, erosion)


def test_count_sequence_counts_separate_blobs_once_they_appear():
    m = blob_map(blobs=((10, 10, 5, 200), (30, 30, 5, 100)))
    counts = mebin.count_sequence(m, 0, 255, P.sample_rate, P.erosion)
    ts = mebin.sweep_thresholds(4)
    np.testing.assert_array_equal(counts, np.select([ts >= 200, ts >= 100], [0, 1], 2))


def test_erosion_removes_regions_thinner_than_the_kernel_keep_thin_keeps_them():
    m = np.zeros((30, 30), np.uint8)
    m[10:15, 2:28] = 200  # 5 px thick line
    assert not mebin.count_sequence(m, 0, 255, sample_rate=P.sample_rate, erosion="paper").any()
    assert mebin.count_sequence(m, 0, 255, sample_rate=P.sample_rate, erosion="keep_thin").max() == 1
    assert mebin.count_sequence(m, 0, 255, sample_rate=P.sample_rate, erosion="off").max() == 1


def test_min_region_area_is_the_papers_kernel_on_a_256_pixel_map_scaled_with_the_map():
    assert mebin.min_region_area((256, 256)) == 36
    assert mebin.min_region_area((128, 128)) == 9 and mebin.min_region_area((96, 128)) == 9
    assert mebin.min_region_area((512, 300)) == 144 and mebin.min_region_area((16, 16)) == 1


def test_keep_thin_erodes_thick_regions_and_keeps_those_erosion_erases_whole_but_not_specks():
    m = np.zeros((128, 128), np.uint8)
    m[10:30, 10:30] = 200  # thick: eroded as the paper does
    m[60:62, 20:100] = 200  # a 2-pixel line: erased by the erosion, kept whole
    m[100:102, 100:104] = 200  # an 8-pixel speck: under the 9-pixel minimum, dropped
    m[110:113, 50:53] = 200  # a 9-pixel spot: kept
    kept = mebin.binarize(m, 100, erosion="keep_thin")
    eroded = mebin.binarize(m, 100, erosion="paper")
    assert (kept[:50] == eroded[:50]).all() and eroded[10:30, 10:30].sum() == 15 * 15
    assert kept[60:62, 20:100].all() and kept[110:113, 50:53].all() and not kept[100:102, 100:104].any()
    assert mebin.count_sequence(m, 0, 255, sample_rate=P.sample_rate, erosion="keep_thin").max() == 3
    assert mebin.count_sequence(m, 0, 255, sample_rate=P.sample_rate, erosion="paper").max() == 1


def test_a_thin_line_survives_mebin_with_keep_thin_and_vanishes_with_the_papers_erosion():
    """A 2-pixel-wide scratch across a 128-pixel map, blurred as a detector would see it."""
    m = np.zeros((128, 128), np.float32)
    cv2.line(m, (20, 30), (100, 90), 1.0, 2)
    m = np.clip(cv2.GaussianBlur(m, (0, 0), 1.0) / cv2.GaussianBlur(m, (0, 0), 1.0).max() * 230, 0, 255).astype(np.uint8)
    image = np.full((256, 256, 3), 90, np.uint8)
    res, crops = mebin.mebin_image(m, image, 0, 255, MebinParams(crop_size=32, core=0.0, refine="off"))  # the default: keep_thin
    assert res.est_count == 1 and res.mask.any()
    line = cv2.line(np.zeros((256, 256), np.uint8), (40, 60), (200, 180), 1, 2).astype(bool)  # at image size
    assert (res.mask & line).sum() >= 0.9 * line.sum()  # the whole scratch, not eroded
    assert mebin.gt_coverage(line, crops.boxes, crops.areas) == mebin.GtCoverage(1, 1, 1, int(line.sum()), int(line.sum()))
    res, crops = mebin.mebin_image(m, image, 0, 255, MebinParams(erosion="paper", crop_size=32, core=0.0, refine="off"))
    assert res.est_count == 0 and not res.mask.any() and crops.areas.tolist() == [0]


def test_an_unknown_erosion_rule_is_an_error_naming_the_param():
    with pytest.raises(InputError, match="mebin.erosion"):
        mebin.count_sequence(np.zeros((8, 8), np.uint8), 0, 255, P.sample_rate, erosion="opening")


# -- rule 4 ---------------------------------------------------------------------------------


def test_no_stable_interval_means_no_anomaly():
    counts = [0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3] + [0] * 10
    assert mebin.stable_threshold(counts, 0, 255, 4, 4) == (255, 0)


def test_zero_counts_never_form_a_stable_interval():
    assert mebin.stable_threshold([0] * 64, 0, 255, 4, 4) == (255, 0)


def test_interval_of_exactly_min_interval_len_qualifies():
    assert mebin.stable_threshold([0, 5, 5, 5, 5, 0], 0, 255, 4, 4) == (255 - 4 * 4, 5)
    assert mebin.stable_threshold([0, 5, 5, 5, 5, 0], 0, 255, 4, 5) == (255, 0)


def test_count_with_the_longest_run_is_the_estimate_and_the_run_end_the_threshold():
    counts = [0, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3]
    assert mebin.stable_threshold(counts, 0, 255, 4, 4) == (255 - 10 * 4, 1)


def test_equally_long_counts_tie_to_the_first_qualified_in_the_sweep():
    assert mebin.stable_threshold([2, 2, 2, 2, 1, 1, 1, 1], 0, 255, 4, 4) == (255 - 3 * 4, 2)


def test_equally_long_runs_of_the_estimate_tie_to_the_later_run():
    assert mebin.stable_threshold([1, 1, 1, 1, 2, 1, 1, 1, 1, 0], 0, 255, 4, 4) == (255 - 8 * 4, 1)


def test_longest_run_is_compared_by_last_minus_first_index_per_count():
    # count 2 has two short runs, count 1 one run that is longer than either
    counts = [2, 2, 2, 2, 0, 2, 2, 2, 2, 0, 1, 1, 1, 1, 1]
    assert mebin.stable_threshold(counts, 0, 255, 4, 4) == (255 - 14 * 4, 1)


def test_threshold_maps_back_to_the_map_scale_without_uint8_wraparound():
    counts = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4]  # run ends at index 13: t = 203
    expected = int(203 * (200 - 100) / 255 + 100)  # 179, as NumPy 1 computed it
    assert mebin.stable_threshold(counts, np.uint8(100), np.uint8(200), 4, 4) == (expected, 4)


# -- rules 5 and 6 --------------------------------------------------------------------------


def test_binarize_keeps_pixels_strictly_above_the_threshold_then_erodes():
    m = blob_map(blobs=((10, 10, 5, 100), (30, 30, 5, 101)))
    assert not mebin.binarize(m, 101, erosion="off").any()
    only_second = mebin.binarize(m, 100, erosion="off")
    assert only_second.sum() == 100 and only_second[30, 30]
    eroded = mebin.binarize(m, 100, erosion="paper")
    assert eroded.sum() == 25 and not (eroded & ~only_second).any()
    assert (mebin.binarize(m, 100, erosion="keep_thin") == eroded).all()  # 10 x 10: survives the erosion


def test_mask_is_resized_to_the_image_nearest_neighbour():
    small = np.zeros((4, 4), bool)
    small[1, 2] = True
    big = mebin.resize_mask(small, (8, 12))
    assert big.shape == (8, 12) and big.dtype == bool
    assert big.sum() == 6 and big[2:4, 6:9].all()


# -- rule 7 ---------------------------------------------------------------------------------


def square_mask(h, w, *rects):
    m = np.zeros((h, w), bool)
    for x, y, rw, rh in rects:
        m[y : y + rh, x : x + rw] = True
    return m


def test_box_is_a_padded_square_centred_on_the_region():
    assert mebin.region_boxes(square_mask(100, 100, (30, 30, 40, 40)), P.padding, P.min_crop_size) == [(28, 28, 72, 72)]


def test_box_half_side_is_at_least_min_crop_size_of_the_image():
    assert mebin.region_boxes(square_mask(100, 100, (40, 40, 10, 10)), P.padding, P.min_crop_size) == [(35, 35, 55, 55)]


def test_box_half_side_is_capped_at_half_the_image():
    assert mebin.region_boxes(square_mask(100, 100, (0, 10, 100, 20)), P.padding, P.min_crop_size) == [(0, 0, 100, 100)]


def test_box_crossing_a_border_is_shifted_back_inside():
    assert mebin.region_boxes(square_mask(100, 100, (0, 0, 5, 5)), P.padding, P.min_crop_size) == [(0, 0, 20, 20)]
    assert mebin.region_boxes(square_mask(100, 100, (95, 95, 5, 5)), P.padding, P.min_crop_size) == [(80, 80, 100, 100)]


def test_box_taller_than_a_flat_image_stays_anchored_at_the_top():
    boxes = mebin.region_boxes(square_mask(50, 100, (0, 10, 100, 30)), P.padding, P.min_crop_size)
    assert boxes == [(0, 0, 100, 100)]


def test_boxes_come_in_ascending_order_of_region_area():
    m = square_mask(200, 200, (10, 10, 40, 40), (120, 120, 10, 10), (120, 10, 20, 20))
    boxes = mebin.region_boxes(m, P.padding, min_crop_size=0.0)
    assert [b[2] - b[0] for b in boxes] == [10, 22, 44]


def test_no_region_gives_one_box_of_the_whole_image():
    assert mebin.region_boxes(np.zeros((30, 50), bool), P.padding, P.min_crop_size) == [(0, 0, 50, 30)]


# -- rule 8 ---------------------------------------------------------------------------------


def test_box_gap_is_minus_one_for_overlap_and_the_edge_distance_otherwise():
    a = (0, 0, 10, 10)
    assert mebin.box_gap(a, (5, 5, 15, 15)) == -1
    assert mebin.box_gap(a, (10, 0, 20, 10)) == 0
    assert mebin.box_gap(a, (13, 0, 23, 10)) == 3
    assert mebin.box_gap(a, (13, 14, 23, 24)) == 5


def test_boxes_closer_than_the_distance_merge_into_a_square():
    a, b = (0, 0, 10, 10), (12, 0, 22, 10)
    assert mebin.merge_boxes([a, b], 3) == [(0, -6, 22, 16)]
    assert sorted(mebin.merge_boxes([a, b], 2)) == [a, b]


def test_overlapping_boxes_merge_even_at_distance_zero_touching_ones_do_not():
    a = (0, 0, 10, 10)
    assert mebin.merge_boxes([a, (5, 0, 15, 10)], 0) == [(0, -2.5, 15, 12.5)]
    assert len(mebin.merge_boxes([a, (10, 0, 20, 10)], 0)) == 2


def test_groups_inside_bigger_groups_are_dropped_and_union_squared_after_each_box():
    a, b, c, k = (0, 0, 10, 10), (30, 0, 40, 10), (0, 40, 10, 50), (5, 5, 35, 45)
    # k overlaps a, b and c; a, b and c are far apart: only k's group survives. Its sorted
    # boxes a, c, k, b are added one by one, squaring after each (the authors' order):
    # (0, 0, 10, 50) -> (-20, 0, 30, 50); + k -> (-20, -2.5, 35, 52.5); + b -> (-20, -5, 40, 55).
    # Squaring only the final union (0, 0, 40, 50) would give (-5, 0, 45, 50).
    assert mebin.merge_boxes([a, b, c, k], 1) == [(-20, -5, 40, 55)]


def test_merged_boxes_are_sorted_largest_first():
    boxes = [(0, 0, 10, 10), (50, 50, 80, 80), (20, 60, 40, 80)]
    assert mebin.merge_boxes(boxes, 1) == [(50, 50, 80, 80), (20, 60, 40, 80), (0, 0, 10, 10)]


def test_crop_boxes_keep_at_most_the_estimated_count_plus_one():
    m = square_mask(200, 200, (10, 10, 30, 30), (100, 100, 20, 20), (160, 20, 10, 10))
    boxes = mebin.crop_boxes(m, est_count=1, padding=P.padding, min_crop_size=0.0, max_merge_dist=P.max_merge_dist)
    assert boxes.tolist() == [[9, 9, 41, 41], [99, 99, 121, 121]]
    assert len(mebin.crop_boxes(m, est_count=5, padding=P.padding, min_crop_size=0.0, max_merge_dist=P.max_merge_dist)) == 3


def test_crop_boxes_round_half_coordinates_half_to_even():
    # boxes (40, 40, 50, 50) and (51, 39, 63, 51) merge into (40, 33.5, 63, 56.5)
    m = square_mask(100, 100, (40, 40, 10, 10), (52, 40, 11, 11))
    (box,) = mebin.crop_boxes(m, est_count=1, padding=P.padding, min_crop_size=0.0, max_merge_dist=0.05)
    assert box.tolist() == [40, 34, 63, 56]


# -- rule 9 ---------------------------------------------------------------------------------


def test_crops_outside_the_image_are_black_and_areas_count_mask_pixels():
    image = np.full((20, 20, 3), 100, np.uint8)
    mask = square_mask(20, 20, (0, 0, 3, 3))
    scores = np.zeros((20, 20), np.float32)
    scores[1, 1] = 204
    c = mebin.extract_crops(image, mask, scores, np.array([[-5, -5, 5, 5]]), crop_size=10, core=0.0)
    assert c.crops.shape == (1, 10, 10, 3) and c.crop_masks.shape == (1, 10, 10)
    assert (c.crops[0, :5] == 0).all() and (c.crops[0, 5:, 5:] == 100).all()
    assert c.crop_masks[0].sum() == 9 and c.areas.tolist() == [9]
    assert c.scores.tolist() == [pytest.approx(0.8)]


def test_non_square_crops_keep_the_top_left_square_after_resizing_the_short_side():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 14:] = 255  # the top-left square of the 10 x 5 resize only sees columns 0..11
    mask, scores = np.zeros((10, 20), bool), np.zeros((10, 20), np.float32)
    c = mebin.extract_crops(image, mask, scores, np.array([[0, 0, 20, 10]]), 5, 0.0)
    assert c.crops.shape == (1, 5, 5, 3) and (c.crops[0] == 0).all()


def test_scores_are_clipped_to_one():
    scores = np.full((8, 8), 300, np.float32)
    c = mebin.extract_crops(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), scores, np.array([[0, 0, 8, 8]]), 4, 0.0)
    assert c.scores.tolist() == [1.0]


def test_the_core_keeps_the_regions_pixels_near_its_peak_and_leaves_the_rest_of_the_crop_as_it_was():
    image = np.full((20, 20, 3), 100, np.uint8)
    mask = square_mask(20, 20, (2, 2, 10, 10))  # rows and columns 2..11
    scores = np.zeros((20, 20), np.float32)
    scores[2:12, 2:12] = 100
    scores[5:8, 5:8] = 200  # the peak
    scores[0, 0] = 255  # higher, but outside the region: not its peak
    box = np.array([[0, 0, 20, 20]])
    whole = mebin.extract_crops(image, mask, scores, box, crop_size=20, core=0.0)
    core = mebin.extract_crops(image, mask, scores, box, crop_size=20, core=0.7)
    assert whole.crop_masks[0].sum() == 100
    assert core.crop_masks[0].sum() == 9 and core.crop_masks[0, 5:8, 5:8].all()  # 100 < 0.7 * 200
    assert core.areas.tolist() == whole.areas.tolist() == [100]  # area and score: the whole region's
    assert core.scores.tolist() == whole.scores.tolist() == [1.0]
    assert np.array_equal(core.crops, whole.crops)
    assert mebin.extract_crops(image, mask, scores, box, 20, core=0.4).crop_masks[0].sum() == 100  # 100 >= 0.4 * 200


def test_the_core_of_a_region_without_a_positive_score_or_of_no_region_is_the_mask():
    m = square_mask(10, 10, (2, 2, 4, 4)).astype(np.uint8)
    assert np.array_equal(mebin.core_mask(m, np.zeros((10, 10), np.float32), 0.7), m)  # own-range regions under the set's range
    empty = np.zeros((10, 10), np.uint8)
    assert np.array_equal(mebin.core_mask(empty, np.ones((10, 10), np.float32), 0.7), empty)
    assert np.array_equal(mebin.core_mask(m, np.arange(100, dtype=np.float32).reshape(10, 10), 0.0), m)


def test_core_must_be_a_fraction():
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match=r"mebin\.core must be in \[0, 1\)"):
            mebin.check_params(MebinParams(core=bad))


# -- the whole per-image job ----------------------------------------------------------------


def test_mebin_image_finds_one_blob_and_crops_around_it():
    m = blob_map(size=64, blobs=((20, 30, 6, 200),))
    image = np.full((64, 64, 3), 50, np.uint8)
    for erosion in ("keep_thin", "paper"):  # a blob that survives the erosion: the paper's result
        res, crops = mebin.mebin_image(m, image, 0, 255, MebinParams(crop_size=16, erosion=erosion, padding=0.1, core=0.0, refine="off"))
        assert res.est_count == 1 and res.threshold == 3
        assert res.counts.shape == (64,) and res.mask.shape == (64, 64)
        assert res.mask.sum() == 49  # the 12 x 12 block eroded by the 6 x 6 kernel
        assert crops.boxes.tolist() == [[14, 24, 26, 36]]
        assert crops.regions.tolist() == [[17, 27, 24, 34]]  # the defect's own box: the 7 x 7 mask
        assert crops.areas.tolist() == [49] and crops.scores.tolist() == [pytest.approx(200 / 255)]
        assert crops.crops.shape == (1, 16, 16, 3)


def test_mebin_image_resizes_a_smaller_map_to_the_image():
    m = blob_map(size=32, blobs=((10, 10, 5, 200), (24, 24, 4, 150)))
    res, crops = mebin.mebin_image(m, np.zeros((96, 64, 3), np.uint8), 0, 255, MebinParams(crop_size=8, core=0.0, refine="off"))
    assert res.mask.shape == (96, 64) and res.est_count == 2
    assert len(crops) == 2 and (crops.boxes[:, 2] - crops.boxes[:, 0] >= 6).all()
    assert 0 < crops.scores.min() and crops.scores.max() <= 1


def test_mebin_image_without_anomaly_keeps_the_whole_image_as_one_crop():
    res, crops = mebin.mebin_image(np.zeros((16, 16), np.uint8), np.zeros((30, 40, 3), np.uint8), 0, 255, MebinParams(crop_size=256, core=0.0, refine="off"))
    assert (res.threshold, res.est_count) == (255, 0) and not res.mask.any()
    assert crops.boxes.tolist() == [[0, 0, 40, 30]] and crops.areas.tolist() == [0]
    assert crops.regions.tolist() == [[0, 0, 0, 0]]  # no region, no defect box


def test_the_defect_box_is_the_extent_of_the_crop_mask_inside_the_image():
    # a 60 x 25 px hole in the corner of a 128 x 128 image: the context crop is the padded square
    # (here the whole image), the defect box the hole
    mask = np.zeros((128, 128), bool)
    mask[100:125, 60:120] = True
    scores = np.where(mask, 200.0, 0.0).astype(np.float32)
    boxes = mebin.crop_boxes(mask, 1, padding=1.0, min_crop_size=0.1, max_merge_dist=0.01)
    crops = mebin.extract_crops(np.zeros((128, 128, 3), np.uint8), mask, scores, boxes, 16, core=0.0)
    assert crops.boxes.tolist() == [[8, 8, 128, 128]]  # the square context: 120 px for a 60 px hole
    assert crops.regions.tolist() == [[60, 100, 120, 125]]


def test_with_a_core_the_defect_box_is_the_core_s_extent():
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True  # a wide region on a smooth map ...
    scores = np.where(mask, 100.0, 0.0).astype(np.float32)
    scores[20:25, 22:30] = 250.0  # ... whose peak is the defect
    crops = mebin.extract_crops(np.zeros((64, 64, 3), np.uint8), mask, scores, np.array([[0, 0, 64, 64]]), 16, core=0.6)
    assert crops.regions.tolist() == [[22, 20, 30, 25]] and crops.areas.tolist() == [900]


def test_a_weak_map_falls_back_to_its_own_range_and_keeps_its_low_score():
    # peaks at 60 where the set's weakest peak is 100: nothing on the set's range
    weak = blob_map(size=64, blobs=((20, 30, 6, 60),), noise=10)
    image = np.zeros((64, 64, 3), np.uint8)
    res, crops = mebin.mebin_image(weak, image, 100, 255, MebinParams(crop_size=16, fallback="none", core=0.0, refine="off"))
    assert res.est_count == 0 and not res.own_range and crops.areas.tolist() == [0]
    res, crops = mebin.mebin_image(weak, image, 100, 255, MebinParams(crop_size=16, padding=0.1, core=0.0, refine="off"))
    assert res.own_range and res.est_count == 1
    assert res.mask.sum() == 49 and res.mask[27:34, 17:24].all()  # the eroded block, none of the noise
    assert crops.boxes.tolist() == [[14, 24, 26, 36]]
    assert crops.scores.tolist() == [0.0]  # scores stay on the set's range: 60 < lo


def test_the_fallback_leaves_maps_found_on_the_sets_range_and_flat_maps_alone():
    m = blob_map(size=64, blobs=((20, 30, 6, 200),))
    image = np.zeros((64, 64, 3), np.uint8)
    a = mebin.mebin_image(m, image, 0, 255, MebinParams(crop_size=16, core=0.0, refine="off"))
    b = mebin.mebin_image(m, image, 0, 255, MebinParams(crop_size=16, fallback="none", core=0.0, refine="off"))
    assert not a[0].own_range and a[0].threshold == b[0].threshold and (a[1].boxes == b[1].boxes).all()
    res, _ = mebin.mebin_image(np.full((16, 16), 30, np.uint8), np.zeros((16, 16, 3), np.uint8), 100, 255, MebinParams(crop_size=8, core=0.0, refine="off"))
    assert res.own_range and res.est_count == 0  # a flat map has no region on any range


def test_an_unknown_fallback_is_an_error_naming_the_param():
    with pytest.raises(InputError, match="mebin.fallback"):
        mebin.check_params(MebinParams(crop_size=8, fallback="peak", core=0.0, refine="off"))


def test_all_zero_maps_get_the_no_anomaly_result():
    with pytest.warns(RuntimeWarning):
        lo, hi = mebin.search_range(np.zeros((3, 16, 16), np.uint8))
    res, crops = mebin.mebin_image(np.zeros((16, 16), np.uint8), np.zeros((16, 16, 3), np.uint8), lo, hi, MebinParams(crop_size=256, core=0.0, refine="off"))
    assert (res.threshold, res.est_count, len(crops)) == (255, 0, 1)


def test_a_constant_map_at_the_top_of_the_range_is_one_region_covering_the_image():
    flat, image = np.full((16, 16), 200, np.uint8), np.zeros((32, 32, 3), np.uint8)
    res, crops = mebin.mebin_image(flat, image, 0, 200, MebinParams(crop_size=256, core=0.0, refine="off"))
    assert res.est_count == 1 and res.mask.all() and crops.boxes.tolist() == [[0, 0, 32, 32]]


def test_mebin_image_rejects_float_maps_grey_images_and_bad_ranges():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="uint8"):
        mebin.mebin_image(np.zeros((8, 8), np.float32), image, 0, 255, MebinParams(crop_size=256, core=0.0, refine="off"))
    with pytest.raises(InputError, match="RGB"):
        mebin.mebin_image(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), 0, 255, MebinParams(crop_size=256, core=0.0, refine="off"))
    with pytest.raises(InputError, match="lo <= hi"):
        mebin.mebin_image(np.zeros((8, 8), np.uint8), image, 200, 100, MebinParams(crop_size=256, core=0.0, refine="off"))


def test_gt_coverage_counts_regions_found_regions_whole_in_a_crop_and_pixels():
    # regions: A 10 x 10 (100 px), B 20 x 20 (400 px), C 5 x 5 (25 px: too small to count as a region)
    gt = square_mask(100, 100, (10, 10, 10, 10), (60, 60, 20, 20), (90, 5, 5, 5))
    # box 1 holds A whole; box 2 holds 15 of B's 20 columns (75 % of B, not its bounding box);
    # box 3 holds C but has no mask pixels (an image's whole-image crop without anomaly): ignored
    boxes = np.array([[0, 0, 30, 30], [65, 55, 100, 100], [85, 0, 100, 15]])
    cov = mebin.gt_coverage(gt, boxes, areas=np.array([50, 80, 0]))
    assert cov == mebin.GtCoverage(regions=2, found=2, whole=1, pixels=525, pixels_in=100 + 300)
    assert cov.metrics() == {
        "gt_regions": 2, "gt_regions_found": 1.0, "gt_regions_whole_in_a_crop": 0.5, "gt_pixels_in_crops": 400 / 525
    }
    # B is found with half of its pixels inside (10 of 20 columns), not with less (9)
    assert mebin.gt_coverage(gt, np.array([[70, 55, 100, 100]]), np.array([1])).found == 1
    assert mebin.gt_coverage(gt, np.array([[71, 55, 100, 100]]), np.array([1])).found == 0


def test_gt_coverage_sums_over_images_and_is_none_without_ground_truth():
    one = mebin.GtCoverage(2, 1, 1, 100, 50)
    assert one + one == mebin.GtCoverage(4, 2, 2, 200, 100)
    assert mebin.GtCoverage().metrics()["gt_regions_found"] is None
