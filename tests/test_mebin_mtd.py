"""MEBin on MTD: crops recover the ground-truth defects of synthetic maps (issue 3, "Done when"),
and ``erosion: keep_thin`` keeps the thin and small defects the paper's erosion erases on maps
at the pipeline's resolution."""

from __future__ import annotations

import pytest

from anomalyncd.mebin import GtCoverage
from benchmarks.mtd_mebin_recall import recovery

from .conftest import MTD, requires_mtd

pytestmark = [pytest.mark.mtd, requires_mtd()]


def _total(res: dict) -> GtCoverage:
    return sum(res["coverage"].values(), GtCoverage())


def test_crops_contain_at_least_90_percent_of_large_ground_truth_regions():
    res = recovery(MTD, "keep_thin", seed=0, progress=False)
    c = _total(res)
    assert res["images"] == 392 and c.whole / c.regions >= 0.90


def test_on_128_pixel_maps_keep_thin_keeps_the_defects_the_papers_erosion_erases():
    thin = recovery(MTD, "keep_thin", seed=0, map_size=128, progress=False)
    paper = recovery(MTD, "paper", seed=0, map_size=128, progress=False)
    t, p = _total(thin), _total(paper)
    assert t.found / t.regions >= 0.95 and p.found / p.regions < 0.85
    assert sum(thin["no_anomaly"].values()) <= 8 and sum(paper["no_anomaly"].values()) >= 40
    assert paper["no_anomaly"]["crack"] >= 20 and thin["no_anomaly"]["crack"] == 0  # the thin ones
