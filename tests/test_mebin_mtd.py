"""MEBin on MTD: crops recover the ground-truth defects of synthetic maps (issue 3, "Done when"),
and the area noise filter keeps the thin and small defects the paper's erosion erases on maps at
the pipeline's resolution."""

from __future__ import annotations

import pytest

from anomalyncd.mebin import GtCoverage
from benchmarks.mtd_mebin_recall import recovery

from .conftest import MTD, requires_mtd

pytestmark = [pytest.mark.mtd, requires_mtd()]


def _total(res: dict) -> GtCoverage:
    return sum(res["coverage"].values(), GtCoverage())


def test_crops_contain_at_least_90_percent_of_large_ground_truth_regions():
    res = recovery(MTD, "area", seed=0, progress=False)
    c = _total(res)
    assert res["images"] == 392 and c.whole / c.regions >= 0.90


def test_on_128_pixel_maps_the_area_filter_keeps_the_defects_erosion_erases():
    area = recovery(MTD, "area", seed=0, map_size=128, progress=False)
    erosion = recovery(MTD, "erosion", seed=0, map_size=128, progress=False)
    a, e = _total(area), _total(erosion)
    assert a.found / a.regions >= 0.95 and e.found / e.regions < 0.85
    assert sum(area["no_anomaly"].values()) <= 8 and sum(erosion["no_anomaly"].values()) >= 40
    assert erosion["no_anomaly"]["crack"] >= 20 and area["no_anomaly"]["crack"] == 0  # the thin ones
