"""MEBin on MTD: crops recover the ground-truth defects of synthetic maps (issue 3, "Done when")."""

from __future__ import annotations

import pytest

from benchmarks.mtd_mebin_recall import recovery

from .conftest import MTD, requires_mtd

pytestmark = [pytest.mark.mtd, requires_mtd()]


def test_crops_contain_at_least_90_percent_of_large_ground_truth_regions():
    res = recovery(MTD, seed=0, progress=False)
    n = sum(n for n, _ in res["types"].values())
    covered = sum(c for _, c in res["types"].values())
    assert res["images"] == 392 and covered / n >= 0.90
